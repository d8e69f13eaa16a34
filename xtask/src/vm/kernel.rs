//! Debian's cloud kernels, downloaded as packages and unpacked under target/vm/<kernel>/ (no
//! install scripts run, nothing touches the host's /boot), so a rerun downloads nothing.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use super::{Apt, Kernel};
use crate::status;

/// The meta-package that depends on the current versioned cloud kernel of its suite.
const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// A kernel package, unpacked.
pub struct Unpacked {
    pub vmlinuz: PathBuf,
    /// lib/modules/<release> of the package.
    pub modules: PathBuf,
}

pub fn ensure(kernel: &Kernel, dir: &Path) -> Result<Unpacked> {
    let unpacked = dir.join("kernel");
    if find(&unpacked).is_none() {
        fetch(kernel, dir, &unpacked)?;
    }
    find(&unpacked).context("the kernel package has no vmlinuz or no modules")
}

fn find(unpacked: &Path) -> Option<Unpacked> {
    let first = |dir: PathBuf, prefix: &str| {
        fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
    };
    let vmlinuz = first(unpacked.join("boot"), "vmlinuz-")?;
    let modules = first(unpacked.join("lib/modules"), "")
        .or_else(|| first(unpacked.join("usr/lib/modules"), ""))?;
    Some(Unpacked { vmlinuz, modules })
}

fn fetch(kernel: &Kernel, dir: &Path, unpacked: &Path) -> Result<()> {
    let apt = AptConfig::new(&kernel.apt, &dir.join("apt"))?;
    if !apt.has_lists() {
        apt.update()?;
    }
    let package = match apt.resolve(kernel) {
        Ok(p) => p,
        // Stale or absent package lists: refresh once.
        Err(_) => {
            apt.update()?;
            apt.resolve(kernel)?
        }
    };
    eprintln!("xtask: downloading {package}");
    if !apt.download(&package, dir) {
        apt.update()?;
        if !apt.download(&package, dir) {
            bail!("cannot download {package} with apt-get");
        }
    }
    let deb = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&format!("{package}_")) && n.ends_with(".deb")
            })
        })
        .context("the downloaded kernel package is missing")?;
    // Unpack beside the final place, then rename: an interrupted run leaves no half kernel.
    let partial = dir.join("kernel.partial");
    let _ = fs::remove_dir_all(&partial);
    status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    let _ = fs::remove_dir_all(unpacked);
    fs::rename(&partial, unpacked)?;
    Ok(())
}

/// apt-get and apt-cache, either as the host is configured or with a private configuration for
/// one extra suite, so that nothing of the host's apt set-up changes.
struct AptConfig {
    options: Vec<String>,
    lists: Option<PathBuf>,
}

impl AptConfig {
    fn new(apt: &Apt, state: &Path) -> Result<AptConfig> {
        let Apt::Suite { uri, suite } = apt else {
            return Ok(AptConfig { options: Vec::new(), lists: None });
        };
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        if !Path::new(keyring).exists() {
            bail!("{keyring} is missing: apt-get install debian-archive-keyring");
        }
        let sources = state.join("sources.list.d");
        let lists = state.join("lists");
        let cache = state.join("cache");
        for d in [&sources, &lists.join("partial"), &cache.join("archives/partial")] {
            fs::create_dir_all(d)?;
        }
        fs::write(
            sources.join(format!("{suite}.sources")),
            format!(
                "Types: deb\nURIs: {uri}\nSuites: {suite}\nComponents: main\nSigned-By: {keyring}\n"
            ),
        )?;
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let options = [
            "Dir::Etc::SourceList=/dev/null".to_owned(),
            format!("Dir::Etc::SourceParts={}", path(&sources)),
            format!("Dir::State::Lists={}", path(&lists)),
            format!("Dir::Cache={}", path(&cache)),
            // Only downloads happen here: no installed-package state is read or written.
            "Dir::State::Status=/dev/null".to_owned(),
            // Files land in target/, which apt's unprivileged download user may not write.
            "APT::Sandbox::User=root".to_owned(),
        ];
        let options = options.into_iter().flat_map(|o| ["-o".to_owned(), o]).collect();
        Ok(AptConfig { options, lists: Some(lists) })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(&self.options);
        cmd
    }

    fn has_lists(&self) -> bool {
        let Some(lists) = &self.lists else { return true };
        fs::read_dir(lists).is_ok_and(|d| {
            d.flatten().any(|e| e.file_name().to_string_lossy().contains("Packages"))
        })
    }

    fn update(&self) -> Result<()> {
        status(self.command("apt-get").args(["update", "-q"]).stdout(Stdio::null()))
    }

    /// The versioned kernel package the meta-package depends on, checked to be `kernel`'s.
    fn resolve(&self, kernel: &Kernel) -> Result<String> {
        let out = self.command("apt-cache").args(["depends", META_PACKAGE]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let package = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: "))
            .filter(|p| p.starts_with("linux-image-"))
            .with_context(|| format!("apt-cache knows no {META_PACKAGE}"))?;
        // "linux-image-6.1.0-48-cloud-amd64", "linux-image-6.12.95+deb12-cloud-amd64"
        let version = package.trim_start_matches("linux-image-");
        let matches = version
            .strip_prefix(kernel.name)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('-'));
        if !matches {
            bail!("{META_PACKAGE} now depends on {package}, not a {} kernel", kernel.name);
        }
        Ok(package.to_owned())
    }

    fn download(&self, package: &str, dir: &Path) -> bool {
        self.command("apt-get")
            .args(["download", "-q", package])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

/// A module of the unpacked kernel as an uncompressed ELF file: busybox insmod cannot read the
/// `.ko.xz` files newer Debian kernels ship.
pub fn module(modules: &Path, relative: &str) -> Result<Vec<u8>> {
    let plain = modules.join(format!("kernel/{relative}.ko"));
    if plain.exists() {
        return fs::read(&plain).with_context(|| format!("reading {}", plain.display()));
    }
    let xz = modules.join(format!("kernel/{relative}.ko.xz"));
    if !xz.exists() {
        bail!("the kernel package has no {relative}.ko or {relative}.ko.xz");
    }
    let out = Command::new("xz").arg("-dc").arg(&xz).output().context("running xz")?;
    if !out.status.success() {
        bail!("xz -dc {} failed: {}", xz.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}
