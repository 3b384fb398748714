-- See migrations/sqlite/0007_images.sql.
CREATE TABLE images (
    digest TEXT PRIMARY KEY NOT NULL,
    image_index TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    manifest_size BIGINT NOT NULL,
    kernel_sha256 TEXT NOT NULL,
    kernel_size BIGINT NOT NULL,
    qcow2_sha256 TEXT NOT NULL,
    qcow2_size BIGINT NOT NULL,
    published_ms BIGINT NOT NULL
);
CREATE INDEX images_by_index ON images (image_index, published_ms);
CREATE INDEX images_by_kernel ON images (kernel_sha256);
CREATE INDEX images_by_qcow2 ON images (qcow2_sha256);
CREATE TABLE image_current (
    image_index TEXT PRIMARY KEY NOT NULL,
    digest TEXT NOT NULL REFERENCES images (digest)
);
ALTER TABLE jobs ADD COLUMN image_digest TEXT;
