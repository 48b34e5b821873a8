//! A private `nats-server` for the `nats` layer's tests: on a free loopback port, with its own
//! JetStream store directory, killed and removed on drop. The shared server on 4222 is never
//! used or touched. `scripts/setup.sh` installs the binary (Debian's `nats-server`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub struct PrivateNats {
    pub port: u16,
    /// JetStream's store (`-sd`); kept across [`PrivateNats::restart`].
    pub store: PathBuf,
    jetstream: bool,
    child: Option<std::process::Child>,
}

impl PrivateNats {
    /// A server with JetStream, ready to answer.
    pub async fn start() -> PrivateNats {
        PrivateNats::start_with(true).await
    }

    /// A server without JetStream (core NATS only).
    pub async fn start_without_jetstream() -> PrivateNats {
        PrivateNats::start_with(false).await
    }

    async fn start_with(jetstream: bool) -> PrivateNats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let store = crate::temp_dir(&format!("nats-{port}-{}", std::process::id()));
        let mut s = PrivateNats {
            port,
            store,
            jetstream,
            child: None,
        };
        s.restart().await;
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and store, and waits until it accepts
    /// connections.
    pub async fn restart(&mut self) {
        let mut cmd = std::process::Command::new(nats_binary());
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if self.jetstream {
            cmd.arg("-js").arg("-sd").arg(&self.store);
        }
        let log = std::fs::File::create(self.store.join(format!("server-{}.log", self.port)))
            .expect("server log file");
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start nats-server (scripts/setup.sh installs it): {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::Read;
                let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 4];
                if c.read(&mut buf)
                    .map(|n| n > 0 && &buf[..4] == b"INFO")
                    .unwrap_or(false)
                {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "nats-server on port {} did not answer within 15 s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.jetstream {
            // JetStream answers a little after the port opens (it recovers its store first).
            let client = crate::nats_server::connect(&self.url()).await;
            let deadline = Instant::now() + Duration::from_secs(15);
            while !jetstream_ready(&client).await {
                assert!(
                    Instant::now() < deadline,
                    "JetStream on port {} not ready within 15 s",
                    self.port
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// SIGKILL, as a crash would; the store stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The number of messages in `stream` (work-queue retention: waiting or being worked on).
    pub async fn stream_messages(&self, stream: &str) -> u64 {
        let js = async_nats::jetstream::new(connect(&self.url()).await);
        let mut s = js.get_stream(stream).await.expect("the stream exists");
        s.info().await.expect("stream info").state.messages
    }

    /// The last sequence of `stream`: how many messages it ever stored (each once).
    pub async fn stream_last_sequence(&self, stream: &str) -> u64 {
        let js = async_nats::jetstream::new(connect(&self.url()).await);
        let mut s = js.get_stream(stream).await.expect("the stream exists");
        s.info().await.expect("stream info").state.last_sequence
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// A plain client for the test's own look at the server.
pub async fn connect(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

async fn jetstream_ready(client: &async_nats::Client) -> bool {
    match client.request("$JS.API.INFO", "".into()).await {
        Ok(m) => serde_json::from_slice::<serde_json::Value>(&m.payload)
            .map(|v| v.get("error").is_none())
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn nats_binary() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into())
}

/// The `[features]`/`[nats]` sections for a server at `url`, with test-friendly waits.
pub fn nats_section(url: &str, stream: &str, partitions: u32, extra: &str) -> String {
    format!(
        "[nats]\nurl = \"{url}\"\nstream = \"{stream}\"\nsubject_prefix = \"t{stream}\"\npartitions = {partitions}\n\
         consumer_prefix = \"w{stream}\"\nack_wait_ms = 2000\nprogress_interval_ms = 500\nconnect_timeout_ms = 2000\n{extra}"
    )
}
