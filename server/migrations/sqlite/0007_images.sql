-- Images published by `construir-server image publish INDEX`: the kernel, the qcow2 and the
-- manifest are blobs; an image's digest is the sha256 of its manifest file's bytes (the manifest
-- names the kernel's and the qcow2's sha256, checked against the blobs at publication, so the
-- digest pins all three). Rows are never deleted: older digests stay listed, and their blobs
-- named (retention.rs `referenced`).
CREATE TABLE images (
    digest TEXT PRIMARY KEY NOT NULL,
    image_index TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    manifest_size INTEGER NOT NULL,
    kernel_sha256 TEXT NOT NULL,
    kernel_size INTEGER NOT NULL,
    qcow2_sha256 TEXT NOT NULL,
    qcow2_size INTEGER NOT NULL,
    published_ms INTEGER NOT NULL
);
CREATE INDEX images_by_index ON images (image_index, published_ms);
CREATE INDEX images_by_kernel ON images (kernel_sha256);
CREATE INDEX images_by_qcow2 ON images (qcow2_sha256);
-- Each index's current digest: what a job submitted for that index is pinned to.
CREATE TABLE image_current (
    image_index TEXT PRIMARY KEY NOT NULL,
    digest TEXT NOT NULL REFERENCES images (digest)
);
-- The image digest a job was pinned to at submit (NULL: its index had none published; runners
-- use their local image of that index).
ALTER TABLE jobs ADD COLUMN image_digest TEXT;
