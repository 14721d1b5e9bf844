//! Upstream: the node report pushed to the controller every interval, with
//! retries and a bounded backlog while the controller is down; and base image
//! downloads over HTTP.

use std::collections::VecDeque;
use std::time::Duration;

use hyper::Method;
use vmm_api::DiskFormat;

use crate::api::http::{download_with_length, request_url, HttpError, HttpUrl};
use crate::images::{ImageError, ImageInfo};
use crate::report::UpstreamStats;
use crate::Agent;

/// Where and how often to push node reports.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `http://host:port/path`; each report is POSTed there as JSON.
    pub url: String,
    /// Time between reports.
    pub interval: Duration,
    /// Reports kept while the controller is unreachable (oldest dropped first).
    pub max_backlog: usize,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Extra attempts per interval for the oldest report.
    pub retries: u32,
}

impl UpstreamConfig {
    /// Defaults: every 10 s, 60 reports of backlog, 5 s timeout, 2 retries.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            interval: Duration::from_secs(10),
            max_backlog: 60,
            timeout: Duration::from_secs(5),
            retries: 2,
        }
    }
}

/// Starts pushing node reports; the task runs until aborted.
pub fn spawn_pusher(
    agent: Agent,
    cfg: UpstreamConfig,
) -> Result<tokio::task::JoinHandle<()>, HttpError> {
    let url = HttpUrl::parse(&cfg.url)?;
    Ok(tokio::spawn(run(agent, url, cfg)))
}

async fn push(url: &HttpUrl, body: &[u8], timeout: Duration) -> Result<(), String> {
    match request_url(Method::POST, url, Some(body.to_vec()), timeout, 64 << 10).await {
        Ok(r) if r.status.is_success() => Ok(()),
        Ok(r) => Err(format!("status {}", r.status)),
        Err(e) => Err(e.to_string()),
    }
}

async fn run(agent: Agent, url: HttpUrl, cfg: UpstreamConfig) {
    let mut backlog: VecDeque<Vec<u8>> = VecDeque::new();
    let mut stats = UpstreamStats::default();
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tick.tick().await;
        match serde_json::to_vec(&agent.node_report()) {
            Ok(body) => {
                if backlog.len() >= cfg.max_backlog.max(1) {
                    backlog.pop_front();
                    stats.dropped += 1;
                }
                backlog.push_back(body);
            }
            Err(e) => tracing::error!("cannot serialize the node report: {e}"),
        }
        'drain: while let Some(body) = backlog.front() {
            let mut attempt = 0;
            loop {
                match push(&url, body, cfg.timeout).await {
                    Ok(()) => {
                        backlog.pop_front();
                        stats.pushed += 1;
                        if last_error.take().is_some() {
                            tracing::info!(url = %cfg.url, "upstream reachable again");
                        }
                        break;
                    }
                    Err(e) => {
                        stats.failures += 1;
                        if last_error.as_deref() != Some(&e) {
                            tracing::warn!(url = %cfg.url, backlog = backlog.len(), "node report push failed: {e}");
                        }
                        last_error = Some(e);
                        if attempt >= cfg.retries {
                            break 'drain;
                        }
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(200) * (1 << attempt)).await;
                    }
                }
            }
        }
        stats.backlog = backlog.len();
        agent.set_upstream_stats(stats);
    }
}

/// Downloads a base image over HTTP into the cache; the sha256 is required
/// (a download is only trusted once its hash matches).
pub async fn import_image_url(
    agent: &Agent,
    url: &str,
    format: DiskFormat,
    sha256: &str,
    timeout: Duration,
) -> Result<ImageInfo, ImageError> {
    let dl = |why: String| ImageError::Download {
        url: url.into(),
        why,
    };
    let expected = crate::spec::parse_image_ref(sha256)
        .ok_or_else(|| ImageError::BadReference(sha256.into()))?;
    if let Some(i) = agent.image_cache().get(&expected) {
        return Ok(i);
    }
    let parsed = HttpUrl::parse(url).map_err(|e| dl(e.to_string()))?;
    let mut w = agent.image_cache().writer(url)?;
    let mut werr = None;
    // The announced length, checked against the cache's free space before
    // the first byte is written (u64::MAX: none announced).
    let announced = std::sync::atomic::AtomicU64::new(u64::MAX);
    let cache = agent.image_cache().clone();
    let status = download_with_length(
        &parsed,
        timeout,
        |n| announced.store(n.unwrap_or(u64::MAX), std::sync::atomic::Ordering::Relaxed),
        |chunk| {
            let n = announced.swap(u64::MAX, std::sync::atomic::Ordering::Relaxed);
            let fits = if n == u64::MAX {
                Ok(())
            } else if n > crate::images::MAX_IMAGE_BYTES {
                Err(ImageError::TooLarge(url.into()))
            } else {
                cache.ensure_fits(n, url)
            };
            fits.and_then(|()| w.write(chunk)).map_err(|e| {
                let s = e.to_string();
                werr = Some(e);
                s
            })
        },
    )
    .await;
    if let Some(e) = werr {
        return Err(e);
    }
    let status = status.map_err(|e| dl(e.to_string()))?;
    if !status.is_success() {
        return Err(dl(format!("status {status}")));
    }
    w.finish(format, Some(&expected), url)
}
