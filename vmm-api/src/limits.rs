//! Rate limits a device applies to what its guest asks of it: the same
//! token-bucket settings serve virtio-blk (bytes and operations) and
//! virtio-net (bytes and frames).

use serde::{Deserialize, Serialize};

/// Largest refill rate of a bucket (units per second): 1 TiB/s or 2^40 ops/s,
/// far above any device, low enough that the arithmetic cannot overflow.
pub const MAX_RATE_PER_SEC: u64 = 1 << 40;

/// One token bucket: `per_second` tokens are added every second, up to
/// `burst` tokens held at once. A request of `n` units takes `n` tokens; when
/// the bucket holds fewer, the device waits until it refills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Sustained rate, units per second (1 to [`MAX_RATE_PER_SEC`]).
    pub per_second: u64,
    /// Most tokens held at once (the largest burst), at least 1 and at most
    /// [`MAX_RATE_PER_SEC`]; when left out, one second's worth.
    #[serde(default)]
    pub burst: Option<u64>,
}

impl TokenBucket {
    /// The bucket's capacity: `burst`, or one second's worth.
    pub fn capacity(&self) -> u64 {
        self.burst.unwrap_or(self.per_second)
    }

    /// Checks the bounds; `what` names the bucket in the message.
    pub fn validate(&self, what: &str) -> Result<(), String> {
        if self.per_second == 0 || self.per_second > MAX_RATE_PER_SEC {
            return Err(format!(
                "{what}: per_second must be 1 to {MAX_RATE_PER_SEC}, got {}; leave the bucket out for no limit",
                self.per_second
            ));
        }
        if let Some(b) = self.burst {
            if b == 0 || b > MAX_RATE_PER_SEC {
                return Err(format!(
                    "{what}: burst must be 1 to {MAX_RATE_PER_SEC}, got {b}"
                ));
            }
        }
        Ok(())
    }
}

/// A device's limits: a bucket for bytes and one for operations (block
/// requests, network frames). Either may be left out (no limit on it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Bytes moved.
    #[serde(default)]
    pub bytes: Option<TokenBucket>,
    /// Operations: block requests, or network frames.
    #[serde(default)]
    pub ops: Option<TokenBucket>,
}

impl RateLimit {
    /// Checks both buckets.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(b) = &self.bytes {
            b.validate("bytes")?;
        }
        if let Some(o) = &self.ops {
            o.validate("ops")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_bounded() {
        let ok = TokenBucket {
            per_second: 1000,
            burst: None,
        };
        ok.validate("b").expect("valid");
        assert_eq!(ok.capacity(), 1000);
        for bad in [
            TokenBucket {
                per_second: 0,
                burst: None,
            },
            TokenBucket {
                per_second: MAX_RATE_PER_SEC + 1,
                burst: None,
            },
            TokenBucket {
                per_second: 1,
                burst: Some(0),
            },
        ] {
            assert!(bad.validate("b").is_err(), "{bad:?}");
        }
        let j: RateLimit =
            serde_json::from_str(r#"{"bytes":{"per_second":1048576,"burst":4096}}"#).expect("json");
        assert_eq!(j.bytes.map(|b| b.capacity()), Some(4096));
        assert!(j.ops.is_none());
        assert!(serde_json::from_str::<RateLimit>(r#"{"byts":{}}"#).is_err());
    }
}
