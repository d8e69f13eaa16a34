//! Debian's nginx as a real server nobody here wrote: a master that pre-forks its workers, which
//! hold the connections. Run from a scratch directory with a tiny response and no access log,
//! for the tests (a pre-forking server watched by the master's pid) and the benchmark (an
//! event-loop server at saturation).
use std::{
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub const NGINX: &str = "/usr/sbin/nginx";

/// A running nginx master; its workers go with it.
pub struct Nginx {
    master: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl Nginx {
    /// Starts nginx with `workers` worker processes in `dir` (created), listening on a free
    /// loopback port, and waits until it accepts connections.
    pub fn start(dir: &Path, workers: u32) -> Result<Nginx, String> {
        if !Path::new(NGINX).exists() {
            return Err(format!("{NGINX} is missing: `cargo xtask test` installs nginx"));
        }
        std::fs::create_dir_all(dir.join("logs")).map_err(|e| e.to_string())?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(dir, port, workers)).map_err(|e| e.to_string())?;
        let master = Command::new(NGINX)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting nginx: {e}"))?;
        let nginx = Nginx { master, port, dir: dir.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() || nginx.workers().is_empty() {
            if Instant::now() > deadline {
                return Err(format!(
                    "nginx did not serve 127.0.0.1:{port} (see {})",
                    dir.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }

    pub fn pid(&self) -> u32 {
        self.master.id()
    }

    /// The worker processes the master forked.
    pub fn workers(&self) -> Vec<u32> {
        children(self.pid())
    }
}

/// The processes `pid` forked that still run.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: nginx's fast shutdown, which takes the workers down too (a killed master
        // would leave them serving).
        // SAFETY: kill with a pid we spawned.
        unsafe { libc::kill(self.master.id() as i32, libc::SIGTERM) };
        let _ = self.master.wait();
    }
}

fn config(dir: &Path, port: u16, workers: u32) -> String {
    let d = dir.display();
    format!(
        "daemon off;\n\
         master_process on;\n\
         worker_processes {workers};\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/logs/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 client_body_temp_path {d}/body;\n\
         \x20 proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n\
         \x20 uwsgi_temp_path {d}/uwsgi;\n\
         \x20 scgi_temp_path {d}/scgi;\n\
         \x20 keepalive_requests 1000000;\n\
         \x20 server {{\n\
         \x20   listen 127.0.0.1:{port};\n\
         \x20   location / {{ return 200 \"ok\\n\"; }}\n\
         \x20 }}\n\
         }}\n"
    )
}
