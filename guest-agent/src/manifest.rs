//! The role manifest: what to run, as whom, how to tell it is ready (and,
//! optionally, still alive) and how to restart it. It lives on the role disk (`/role/role.json`) and is read
//! strictly: unknown fields, oversized values and anything that could not be
//! passed to `execve` are errors with a message that says which field.
//!
//! The role's user is resolved in the guest's `/etc/passwd`
//! ([`crate::passwd`]); the host agent's instance file
//! ([`crate::instance`]) is applied over the manifest
//! ([`Manifest::apply_instance`]): its environment wins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use guest_proto::instance_file::MAX_ENV;
use guest_proto::instance_file::{check_env, InstanceFile};
use serde::Deserialize;

use crate::instance::{ENV_INSTANCE_ID, ENV_ROLE};
use crate::passwd::lookup_user;

/// Where the role manifest is, relative to the role disk's mount point.
pub const MANIFEST_FILE: &str = "role.json";
/// Largest manifest file accepted.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
/// Most arguments.
pub const MAX_ARGS: usize = 256;
/// Longest single string (path, argument, variable value).
pub const MAX_STRING: usize = 4096;

/// Errors reading or validating a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The manifest path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_MANIFEST_BYTES`].
    #[error("{path} is {len} bytes; a role manifest may be at most {MAX_MANIFEST_BYTES}")]
    TooLarge {
        /// The manifest path.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// Not valid JSON for a manifest (syntax, types, unknown fields).
    #[error("{path}: {source}")]
    Json {
        /// The manifest path.
        path: PathBuf,
        /// serde's message (with line and column).
        source: serde_json::Error,
    },
    /// A field is out of its bounds.
    #[error("role manifest field `{field}`: {why}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        why: String,
    },
    /// The user does not exist, or is root.
    #[error("role user {user:?}: {why}")]
    User {
        /// The user name.
        user: String,
        /// What is wrong.
        why: String,
    },
}

fn invalid(field: impl Into<String>, why: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        field: field.into(),
        why: why.into(),
    }
}

/// When to restart the role after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// After every exit.
    Always,
    /// After a non-zero exit code or a signal.
    #[default]
    OnFailure,
    /// Never; the role stays `Exited` (the host may send `RestartRole`).
    Never,
}

/// The readiness check.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Readiness {
    /// A TCP connection to `127.0.0.1:port` succeeds.
    Tcp {
        /// The port.
        port: u16,
    },
    /// `GET path` on `127.0.0.1:port` answers 2xx or 3xx.
    Http {
        /// The port.
        port: u16,
        /// The request path, starting with `/`.
        path: String,
    },
}

/// The liveness section as written (JSON).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLiveness {
    #[serde(default)]
    interval_ms: Option<u64>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    failures: Option<u32>,
}

/// Bounds and defaults of the `liveness` section.
pub mod liveness_limits {
    /// Default `interval_ms`.
    pub const DEFAULT_INTERVAL_MS: u64 = 5_000;
    /// Default `timeout_ms` (never more than the interval).
    pub const DEFAULT_TIMEOUT_MS: u64 = 1_000;
    /// Default `failures`.
    pub const DEFAULT_FAILURES: u32 = 3;
    /// Smallest `interval_ms`.
    pub const MIN_INTERVAL_MS: u64 = 10;
    /// Largest `interval_ms` (10 minutes).
    pub const MAX_INTERVAL_MS: u64 = 600_000;
    /// Smallest `timeout_ms`.
    pub const MIN_TIMEOUT_MS: u64 = 10;
    /// Largest `timeout_ms`.
    pub const MAX_TIMEOUT_MS: u64 = 60_000;
    /// Largest `failures`.
    pub const MAX_FAILURES: u32 = 100;
}

/// The liveness check: once the role is ready, its readiness check is run
/// again every `interval` (each attempt bounded by `timeout`); after
/// `failures` failed attempts in a row the role counts as hung and is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// From the start of one check to the start of the next.
    pub interval: Duration,
    /// Longest one check may take (never more than `interval`).
    pub timeout: Duration,
    /// Consecutive failed checks after which the role counts as hung (≥ 1).
    pub failures: u32,
}

/// The manifest as written (JSON).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    version: u32,
    program: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    working_dir: Option<String>,
    user: String,
    #[serde(default)]
    readiness: Option<Readiness>,
    #[serde(default)]
    readiness_interval_ms: Option<u64>,
    #[serde(default)]
    liveness: Option<RawLiveness>,
    #[serde(default)]
    restart: RawRestart,
    #[serde(default)]
    stop_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    #[serde(default)]
    policy: RestartPolicy,
    #[serde(default)]
    initial_backoff_ms: Option<u64>,
    #[serde(default)]
    max_backoff_ms: Option<u64>,
    #[serde(default)]
    max_restarts: Option<u32>,
    #[serde(default)]
    reset_after_ms: Option<u64>,
}

/// The restart rules, with defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    /// When to restart.
    pub policy: RestartPolicy,
    /// First back-off delay.
    pub initial_backoff: Duration,
    /// Largest back-off delay.
    pub max_backoff: Duration,
    /// Consecutive failed runs after which the role is `Failed` (`None` = never give up).
    pub max_restarts: Option<u32>,
    /// A run at least this long resets the back-off and the failure count.
    pub reset_after: Duration,
}

/// A validated manifest, with the user resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Absolute path of the program.
    pub program: PathBuf,
    /// Its arguments (without argv\[0\]).
    pub args: Vec<String>,
    /// Extra environment (on top of PATH, HOME, USER).
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the user's home, else `/`).
    pub working_dir: PathBuf,
    /// The user's name.
    pub user: String,
    /// Its uid (never 0).
    pub uid: u32,
    /// Its primary gid (never 0).
    pub gid: u32,
    /// Its home directory.
    pub home: String,
    /// How to tell it is ready (`None`: ready once started).
    pub readiness: Option<Readiness>,
    /// Pause between readiness attempts.
    pub readiness_interval: Duration,
    /// The liveness check after the role is ready (`None`: none; never
    /// `Some` without `readiness`).
    pub liveness: Option<Liveness>,
    /// Restart rules.
    pub restart: Restart,
    /// SIGTERM to SIGKILL on `RestartRole`.
    pub stop_timeout: Duration,
}

/// What is wrong with a string for `execve`, if anything.
fn string_problem(s: &str) -> Option<String> {
    if s.len() > MAX_STRING {
        return Some(format!("{} bytes, at most {MAX_STRING}", s.len()));
    }
    if s.contains('\0') {
        return Some("holds a NUL byte".into());
    }
    None
}

fn check_string(field: &str, s: &str) -> Result<(), ManifestError> {
    match string_problem(s) {
        Some(why) => Err(invalid(field, why)),
        None => Ok(()),
    }
}

fn check_abs_path(field: &str, s: &str) -> Result<PathBuf, ManifestError> {
    check_string(field, s)?;
    if !s.starts_with('/') {
        return Err(invalid(field, format!("{s:?} is not an absolute path")));
    }
    Ok(PathBuf::from(s))
}

fn ms(
    field: &str,
    v: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<Duration, ManifestError> {
    let v = v.unwrap_or(default);
    if !(min..=max).contains(&v) {
        return Err(invalid(field, format!("{v} is outside {min}..={max}")));
    }
    Ok(Duration::from_millis(v))
}

/// Validates the `liveness` section; `has_readiness` says whether the
/// manifest has the readiness check it reuses.
fn check_liveness(raw: &RawLiveness, has_readiness: bool) -> Result<Liveness, ManifestError> {
    use liveness_limits::*;
    if !has_readiness {
        return Err(invalid(
            "liveness",
            "the liveness check reuses the manifest's `readiness` check and there is none: \
             add \"readiness\": {\"tcp\": {\"port\": P}} (or an \"http\" check), or remove `liveness`",
        ));
    }
    let interval = ms(
        "liveness.interval_ms",
        raw.interval_ms,
        DEFAULT_INTERVAL_MS,
        MIN_INTERVAL_MS,
        MAX_INTERVAL_MS,
    )?;
    let default_timeout = DEFAULT_TIMEOUT_MS.min(interval.as_millis() as u64);
    let timeout = ms(
        "liveness.timeout_ms",
        raw.timeout_ms,
        default_timeout,
        MIN_TIMEOUT_MS,
        MAX_TIMEOUT_MS,
    )?;
    if timeout > interval {
        return Err(invalid(
            "liveness.timeout_ms",
            format!(
                "{} ms is longer than liveness.interval_ms ({} ms): a check must end before \
                 the next one is due; lower timeout_ms or raise interval_ms",
                timeout.as_millis(),
                interval.as_millis()
            ),
        ));
    }
    let failures = raw.failures.unwrap_or(DEFAULT_FAILURES);
    if !(1..=MAX_FAILURES).contains(&failures) {
        return Err(invalid(
            "liveness.failures",
            format!("{failures} is outside 1..={MAX_FAILURES} (consecutive failed checks before the role counts as hung)"),
        ));
    }
    Ok(Liveness {
        interval,
        timeout,
        failures,
    })
}

/// Parses and validates manifest `text`; `passwd` is the text of the guest's
/// `/etc/passwd`.
pub fn parse(text: &str, passwd: &str, path: &Path) -> Result<Manifest, ManifestError> {
    let raw: Raw = serde_json::from_str(text).map_err(|source| ManifestError::Json {
        path: path.to_owned(),
        source,
    })?;
    if raw.version != 1 {
        return Err(invalid(
            "version",
            format!("{} is not a known manifest version (1)", raw.version),
        ));
    }
    let program = check_abs_path("program", &raw.program)?;
    if raw.args.len() > MAX_ARGS {
        return Err(invalid(
            "args",
            format!("{} arguments, at most {MAX_ARGS}", raw.args.len()),
        ));
    }
    for (i, a) in raw.args.iter().enumerate() {
        check_string(&format!("args[{i}]"), a)?;
    }
    check_env(&raw.env).map_err(|p| invalid(p.field, p.why))?;
    let user_ok = !raw.user.is_empty()
        && raw.user.len() <= 32
        && raw
            .user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if !user_ok {
        return Err(invalid(
            "user",
            "a user name is 1-32 bytes of [A-Za-z0-9_.-]",
        ));
    }
    let entry = lookup_user(passwd, &raw.user).ok_or_else(|| ManifestError::User {
        user: raw.user.clone(),
        why: "not in the guest's /etc/passwd".into(),
    })?;
    if entry.uid == 0 || entry.gid == 0 {
        return Err(ManifestError::User {
            user: raw.user.clone(),
            why: "the role never runs as root (uid or gid 0)".into(),
        });
    }
    let working_dir = match &raw.working_dir {
        Some(d) => check_abs_path("working_dir", d)?,
        None if entry.home.starts_with('/') => PathBuf::from(&entry.home),
        None => PathBuf::from("/"),
    };
    if let Some(r) = &raw.readiness {
        let port = match r {
            Readiness::Tcp { port } => *port,
            Readiness::Http { port, path } => {
                let ok = path.starts_with('/')
                    && path.len() <= 1024
                    && path.bytes().all(|b| b.is_ascii_graphic());
                if !ok {
                    return Err(invalid(
                        "readiness.http.path",
                        "starts with '/', at most 1024 printable ASCII bytes, no spaces",
                    ));
                }
                *port
            }
        };
        if port == 0 {
            return Err(invalid("readiness.port", "0 is not a port"));
        }
    }
    let liveness = match &raw.liveness {
        Some(l) => Some(check_liveness(l, raw.readiness.is_some())?),
        None => None,
    };
    let rr = &raw.restart;
    let initial_backoff = ms(
        "restart.initial_backoff_ms",
        rr.initial_backoff_ms,
        200,
        10,
        600_000,
    )?;
    let max_backoff = ms(
        "restart.max_backoff_ms",
        rr.max_backoff_ms,
        30_000,
        10,
        3_600_000,
    )?;
    if max_backoff < initial_backoff {
        return Err(invalid(
            "restart.max_backoff_ms",
            "smaller than restart.initial_backoff_ms",
        ));
    }
    Ok(Manifest {
        program,
        args: raw.args,
        env: raw.env,
        working_dir,
        user: raw.user,
        uid: entry.uid,
        gid: entry.gid,
        home: entry.home,
        readiness: raw.readiness,
        readiness_interval: ms(
            "readiness_interval_ms",
            raw.readiness_interval_ms,
            200,
            10,
            60_000,
        )?,
        liveness,
        restart: Restart {
            policy: rr.policy,
            initial_backoff,
            max_backoff,
            max_restarts: rr.max_restarts,
            reset_after: ms(
                "restart.reset_after_ms",
                rr.reset_after_ms,
                10_000,
                0,
                86_400_000,
            )?,
        },
        stop_timeout: ms("stop_timeout_ms", raw.stop_timeout_ms, 5_000, 0, 600_000)?,
    })
}

/// Reads (bounded) and validates the manifest at `path`, resolving the user
/// in the passwd file at `passwd`.
pub fn load(path: &Path, passwd: &Path) -> Result<Manifest, ManifestError> {
    use std::io::Read;
    let read_err = |p: &Path| {
        let p = p.to_owned();
        move |source| ManifestError::Read { path: p, source }
    };
    let f = std::fs::File::open(path).map_err(read_err(path))?;
    let len = f.metadata().map_err(read_err(path))?.len();
    if len > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge {
            path: path.to_owned(),
            len,
        });
    }
    let mut text = String::new();
    f.take(MAX_MANIFEST_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_err(path))?;
    let mut pw = String::new();
    std::fs::File::open(passwd)
        .and_then(|f| f.take(1 << 20).read_to_string(&mut pw))
        .map_err(read_err(passwd))?;
    parse(&text, &pw, path)
}

impl Manifest {
    /// Applies the instance file: its environment over the manifest's (the
    /// instance's value wins), then [`ENV_INSTANCE_ID`] and [`ENV_ROLE`].
    pub fn apply_instance(&mut self, inst: &InstanceFile) {
        self.env
            .extend(inst.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.env
            .insert(ENV_INSTANCE_ID.into(), inst.instance_id.clone());
        self.env.insert(ENV_ROLE.into(), inst.role.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nreddog:x:1000:1000:role:/home/reddog:/bin/sh\nzero:x:0:5::/:/bin/sh\n";

    fn p(text: &str) -> Result<Manifest, ManifestError> {
        parse(text, PASSWD, Path::new("/role/role.json"))
    }

    #[test]
    fn full_manifest() {
        let m = p(r#"{"version":1,"program":"/bin/busybox","args":["httpd","-f"],
            "env":{"MODE":"web"},"working_dir":"/role","user":"reddog",
            "readiness":{"http":{"port":8080,"path":"/index.html"}},
            "restart":{"policy":"always","initial_backoff_ms":50,"max_backoff_ms":1000,"max_restarts":3},
            "stop_timeout_ms":100}"#)
        .expect("valid");
        assert_eq!(m.program, PathBuf::from("/bin/busybox"));
        assert_eq!(
            (m.uid, m.gid, m.home.as_str()),
            (1000, 1000, "/home/reddog")
        );
        assert_eq!(m.restart.policy, RestartPolicy::Always);
        assert_eq!(m.restart.max_restarts, Some(3));
        assert_eq!(
            m.readiness,
            Some(Readiness::Http {
                port: 8080,
                path: "/index.html".into()
            })
        );
        assert_eq!(m.stop_timeout, Duration::from_millis(100));
    }

    #[test]
    fn defaults() {
        let m = p(r#"{"version":1,"program":"/role/worker","user":"reddog"}"#).expect("valid");
        assert_eq!(m.restart.policy, RestartPolicy::OnFailure);
        assert_eq!(m.working_dir, PathBuf::from("/home/reddog"));
        assert_eq!(m.readiness, None);
        assert_eq!(m.restart.max_restarts, None);
    }

    #[test]
    fn strict_errors_name_the_field() {
        let cases = [
            (r#"{"version":2,"program":"/x","user":"reddog"}"#, "version"),
            (r#"{"version":1,"program":"x","user":"reddog"}"#, "program"),
            (
                r#"{"version":1,"program":"/x","user":"root"}"#,
                "never runs as root",
            ),
            (
                r#"{"version":1,"program":"/x","user":"zero"}"#,
                "never runs as root",
            ),
            (
                r#"{"version":1,"program":"/x","user":"nobody"}"#,
                "not in the guest",
            ),
            (r#"{"version":1,"program":"/x","user":"a:b"}"#, "user"),
            (
                r#"{"version":1,"program":"/x","user":"reddog","bogus":1}"#,
                "unknown field",
            ),
            (
                r#"{"version":1,"program":"/x","user":"reddog","env":{"1A":"x"}}"#,
                "env.1A",
            ),
            (
                r#"{"version":1,"program":"/x","user":"reddog","args":["a\u0000b"]}"#,
                "NUL",
            ),
            (
                r#"{"version":1,"program":"/x","user":"reddog","readiness":{"http":{"port":80,"path":"x y"}}}"#,
                "readiness.http.path",
            ),
            (
                r#"{"version":1,"program":"/x","user":"reddog","readiness":{"tcp":{"port":0}}}"#,
                "port",
            ),
            (
                r#"{"version":1,"program":"/x","user":"reddog","restart":{"policy":"sometimes"}}"#,
                "unknown variant",
            ),
            (
                r#"{"version":1,"program":"/x","user":"reddog","restart":{"initial_backoff_ms":500,"max_backoff_ms":100}}"#,
                "max_backoff_ms",
            ),
            (
                r#"{"version":1,"program":"/x","user":"reddog","restart":{"initial_backoff_ms":1}}"#,
                "initial_backoff_ms",
            ),
            ("not json", "expected"),
        ];
        for (text, want) in cases {
            let e = p(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        let long = format!(
            r#"{{"version":1,"program":"/x","user":"reddog","args":["{}"]}}"#,
            "a".repeat(MAX_STRING + 1)
        );
        assert!(p(&long).expect_err("long").to_string().contains("args[0]"));
        let many = format!(
            r#"{{"version":1,"program":"/x","user":"reddog","args":[{}]}}"#,
            vec!["\"a\""; MAX_ARGS + 1].join(",")
        );
        assert!(p(&many).expect_err("many").to_string().contains("args"));
    }

    const WITH_READINESS: &str =
        r#""version":1,"program":"/x","user":"reddog","readiness":{"tcp":{"port":80}}"#;

    fn with_liveness(liveness: &str) -> Result<Manifest, ManifestError> {
        p(&format!(r#"{{{WITH_READINESS},"liveness":{liveness}}}"#))
    }

    #[test]
    fn liveness_absent_full_and_defaults() {
        let m = p(&format!("{{{WITH_READINESS}}}")).expect("valid");
        assert_eq!(m.liveness, None, "absent: no liveness checks");
        let m =
            with_liveness(r#"{"interval_ms":5000,"timeout_ms":1000,"failures":3}"#).expect("valid");
        assert_eq!(
            m.liveness,
            Some(Liveness {
                interval: Duration::from_millis(5000),
                timeout: Duration::from_millis(1000),
                failures: 3
            })
        );
        let m = with_liveness("{}").expect("all defaults");
        assert_eq!(
            m.liveness,
            Some(Liveness {
                interval: Duration::from_millis(liveness_limits::DEFAULT_INTERVAL_MS),
                timeout: Duration::from_millis(liveness_limits::DEFAULT_TIMEOUT_MS),
                failures: liveness_limits::DEFAULT_FAILURES
            })
        );
        // A short interval alone: the default timeout shrinks to fit it.
        let l = with_liveness(r#"{"interval_ms":300}"#)
            .expect("valid")
            .liveness
            .expect("some");
        assert_eq!(l.timeout, Duration::from_millis(300));
        // The bounds themselves are accepted.
        let l = with_liveness(r#"{"interval_ms":10,"timeout_ms":10,"failures":1}"#)
            .expect("smallest")
            .liveness
            .expect("some");
        assert_eq!((l.interval.as_millis(), l.failures), (10, 1));
        with_liveness(r#"{"interval_ms":600000,"timeout_ms":60000,"failures":100}"#)
            .expect("largest");
        // It works with an HTTP readiness check too.
        let m = p(r#"{"version":1,"program":"/x","user":"reddog",
            "readiness":{"http":{"port":8080,"path":"/health"}},"liveness":{"interval_ms":1000}}"#)
        .expect("valid");
        assert!(m.liveness.is_some());
    }

    #[test]
    fn liveness_errors_name_the_field() {
        let cases = [
            (r#"{"interval_ms":9}"#, "liveness.interval_ms"),
            (r#"{"interval_ms":600001}"#, "liveness.interval_ms"),
            (
                r#"{"interval_ms":100,"timeout_ms":9}"#,
                "liveness.timeout_ms",
            ),
            (
                r#"{"interval_ms":100000,"timeout_ms":60001}"#,
                "liveness.timeout_ms",
            ),
            (
                r#"{"interval_ms":100,"timeout_ms":200}"#,
                "longer than liveness.interval_ms",
            ),
            (r#"{"failures":0}"#, "liveness.failures"),
            (r#"{"failures":101}"#, "liveness.failures"),
            (r#"{"failures":-1}"#, "invalid value"),
            (r#"{"interval_ms":"5s"}"#, "invalid type"),
            (r#"{"interval":5000}"#, "unknown field `interval`"),
            (r#"{"tcp":{"port":80}}"#, "unknown field `tcp`"),
            ("true", "invalid type"),
        ];
        for (liveness, want) in cases {
            let e = with_liveness(liveness).expect_err(liveness).to_string();
            assert!(e.contains(want), "{liveness}: {e}");
        }
        // Without a readiness check there is nothing to run.
        let e =
            p(r#"{"version":1,"program":"/x","user":"reddog","liveness":{"interval_ms":1000}}"#)
                .expect_err("no readiness")
                .to_string();
        assert!(
            e.contains("`liveness`") && e.contains("add \"readiness\""),
            "{e}"
        );
    }

    #[test]
    fn oversized_file_is_refused_before_parsing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = dir.path().join("role.json");
        std::fs::write(&m, vec![b' '; MAX_MANIFEST_BYTES as usize + 1]).expect("write");
        let pw = dir.path().join("passwd");
        std::fs::write(&pw, PASSWD).expect("write");
        assert!(matches!(load(&m, &pw), Err(ManifestError::TooLarge { .. })));
        assert!(matches!(
            load(&dir.path().join("none.json"), &pw),
            Err(ManifestError::Read { .. })
        ));
    }

    #[test]
    fn instance_env_wins_over_the_manifest_and_names_the_instance() {
        let mut m = p(r#"{"version":1,"program":"/x","user":"reddog",
            "env":{"MODE":"web","KEEP":"1","REDDOG_ROLE":"spoofed"}}"#)
        .expect("valid");
        let i = InstanceFile::decode(
            br#"{"version":1,"instance_id":"web-1","role":"web tier","env":{"MODE":"prod","NEW":"a b\nc"}}"#,
        )
        .expect("valid");
        assert_eq!(i.instance_id, "web-1");
        m.apply_instance(&i);
        let want: BTreeMap<String, String> = [
            ("KEEP", "1"),
            ("MODE", "prod"),
            ("NEW", "a b\nc"),
            ("REDDOG_INSTANCE_ID", "web-1"),
            ("REDDOG_ROLE", "web tier"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(m.env, want);
        // No env at all is fine.
        let i =
            InstanceFile::decode(br#"{"version":1,"instance_id":"a","role":"r"}"#).expect("valid");
        assert!(i.env.is_empty());
    }
}
