//! A job made of a project's source tree and a build script kept outside it, so a stranger's
//! project builds without a fork that adds a `construir` script at its top. `construir-pack
//! --script` and the server's submit form make the same layout:
//!
//! - the tree at [`SOURCE_DIR`] (`/opt/job/src` in the guest; the form ships a tarball that the
//!   job unpacks there, in the VM, never on the server);
//! - the build script at [`BUILD_SCRIPT`], run with `/opt/job/src` as its working directory, by its
//!   own `#!` line if it has one, else by `/bin/sh`;
//! - what `--vendor` fetched at `/opt/job/deps`, its [`DEPS_SETUP`] sourced before the build;
//! - a small `opt/job/construir` from [`wrapper`] that does the above.

/// Where the project's tree lands, relative to the guest's root.
pub const SOURCE_DIR: &str = "opt/job/src";
/// Where the build script lands, relative to the guest's root.
pub const BUILD_SCRIPT: &str = "opt/job/build.sh";
/// What `construir-pack --vendor` fetched for the build, relative to the guest's root; its
/// `setup.sh` (the environment that points the tools at it, and the .debs to install) is
/// sourced before the build script.
pub const DEPS_SETUP: &str = "opt/job/deps/setup.sh";

/// The job's `opt/job/construir`: `unpack`, if given, is a shell command run first (the form's
/// `tar -xzf /opt/job/source.tar.gz -C /opt/job/src`); then the build script runs in the tree.
/// `packed_by` names the tool, for whoever reads the job.
pub fn wrapper(packed_by: &str, unpack: Option<&str>) -> String {
    let packed_by: String = packed_by
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .collect();
    let unpack = unpack.map(|u| format!("{u}\n")).unwrap_or_default();
    format!(
        "#!/bin/sh\n\
         # Packed by {packed_by}: the project's tree is /{SOURCE_DIR}, and the build script,\n\
         # /{BUILD_SCRIPT}, runs there (by its own #! line if it has one, else by /bin/sh).\n\
         set -e\n\
         mkdir -p /{SOURCE_DIR}\n\
         {unpack}\
         if [ -f /{DEPS_SETUP} ]; then . /{DEPS_SETUP}; fi\n\
         cd /{SOURCE_DIR}\n\
         case \"$(head -c 2 /{BUILD_SCRIPT})\" in\n\
         '#!') exec /{BUILD_SCRIPT} ;;\n\
         *) exec sh /{BUILD_SCRIPT} ;;\n\
         esac\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wrapper_unpacks_first_then_runs_the_script_in_the_tree() {
        let w = wrapper("construir-pack", None);
        assert!(w.starts_with("#!/bin/sh\n# Packed by construir-pack:"));
        assert!(w.contains("\ncd /opt/job/src\n"));
        assert!(w.contains("'#!') exec /opt/job/build.sh ;;"));
        assert!(w.contains("*) exec sh /opt/job/build.sh ;;"));
        let setup = w
            .find("if [ -f /opt/job/deps/setup.sh ]; then . /opt/job/deps/setup.sh; fi\n")
            .unwrap();
        assert!(setup < w.find("cd /opt/job/src").unwrap());
        let w = wrapper(
            "a\nform\u{0}",
            Some("tar -xf /opt/job/source.tar -C /opt/job/src"),
        );
        assert!(w.contains("# Packed by aform:"), "{w}");
        let unpack = w.find("tar -xf").unwrap();
        assert!(unpack < w.find("cd /opt/job/src").unwrap());
    }
}
