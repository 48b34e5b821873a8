//! Redis for the layer tests: a unique key prefix on the shared server (cleaned up on drop), and
//! a private `redis-server` on a free loopback port that a test may stop and start again (the
//! shared server on 6379 is never stopped).

use std::time::{Duration, Instant};

/// The shared Redis (`TEST_REDIS_URL`, default `redis://127.0.0.1:6379`).
pub fn shared_redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix of its own for one test; every key under it is deleted on drop.
pub struct RedisPrefix {
    pub url: String,
    pub prefix: String,
}

impl RedisPrefix {
    pub fn new(url: &str) -> RedisPrefix {
        RedisPrefix {
            url: url.to_string(),
            prefix: format!("obs_test_{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// The `[redis]` section pointing at this server with this prefix.
    pub fn section(&self) -> String {
        format!(
            "[redis]\nurl = \"{}\"\nkey_prefix = \"{}\"\ntimeout_ms = 500\n",
            self.url, self.prefix
        )
    }

    /// Keys under the prefix (pattern relative to it, e.g. `dedup:*`).
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let client = redis::Client::open(self.url.as_str()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis");
        redis::cmd("KEYS")
            .arg(format!("{}:{pattern}", self.prefix))
            .query_async(&mut conn)
            .await
            .expect("KEYS")
    }

    /// GET of `<prefix>:<part>`.
    pub async fn get(&self, part: &str) -> Option<String> {
        let client = redis::Client::open(self.url.as_str()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis");
        redis::cmd("GET")
            .arg(format!("{}:{part}", self.prefix))
            .query_async(&mut conn)
            .await
            .expect("GET")
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        let url = self.url.clone();
        let pattern = format!("{}:*", self.prefix);
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(client) = redis::Client::open(url.as_str()) else {
                    return;
                };
                let Ok(Ok(mut conn)) = tokio::time::timeout(
                    Duration::from_secs(2),
                    client.get_multiplexed_async_connection(),
                )
                .await
                else {
                    return;
                };
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(&pattern)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                if !keys.is_empty() {
                    let _: Result<i64, _> =
                        redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A private `redis-server` on 127.0.0.1:`port`, without persistence (or with an append-only
/// file synced on every write: [`PrivateRedis::start_aof`]); killed on drop.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<std::process::Child>,
    /// Where the append-only file lives, when persistence is on.
    aof_dir: Option<std::path::PathBuf>,
}

impl PrivateRedis {
    /// Starts one on a free port and waits until it answers.
    pub async fn start() -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut r = PrivateRedis {
            port,
            child: None,
            aof_dir: None,
        };
        r.restart().await;
        r
    }

    /// Like [`PrivateRedis::start`], with AOF on (`appendfsync always`) in `dir`: what was
    /// acknowledged survives a SIGKILL and [`PrivateRedis::restart`].
    pub async fn start_aof(dir: &std::path::Path) -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).expect("create the Redis data directory");
        let mut r = PrivateRedis {
            port,
            child: None,
            aof_dir: Some(dir),
        };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on the same port (after [`PrivateRedis::kill`]).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let persistence: Vec<String> = match &self.aof_dir {
            None => vec!["--appendonly".into(), "no".into()],
            Some(dir) => vec![
                "--appendonly".into(),
                "yes".into(),
                "--appendfsync".into(),
                "always".into(),
                "--dir".into(),
                dir.display().to_string(),
            ],
        };
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(&persistence)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn redis-server (Debian package redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = redis::Client::open(self.url()).expect("url");
        loop {
            if let Ok(Ok(mut c)) = tokio::time::timeout(
                Duration::from_millis(500),
                client.get_multiplexed_async_connection(),
            )
            .await
            {
                let pong: Result<String, _> = redis::cmd("PING").query_async(&mut c).await;
                if pong.is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer within 10 s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP port that forwards to `target` while open and refuses connections while closed: a
/// destination that goes down and comes back on the same address.
pub struct Gate {
    pub port: u16,
    target: std::net::SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Gate {
    /// A gate on a free port, closed (connections refused).
    pub fn closed(target: std::net::SocketAddr) -> Gate {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Gate {
            port,
            target,
            task: None,
        }
    }

    /// Starts accepting and forwarding.
    pub async fn open(&mut self) {
        assert!(self.task.is_none(), "already open");
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("rebind the gate's port");
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    /// Stops accepting and drops every forwarded connection.
    pub async fn close(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
