//! Link profiles: rate, round-trip time, loss and jitter of the emulated cloud–edge link.

use serde::Serialize;

use crate::NetlabError;

/// What the emulated link does. Both directions get the same rate, half the RTT each, and the same
/// loss probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    /// A profile name (`fiber`, …) or `custom`.
    pub name: String,
    /// Rate of each direction in Mbit/s.
    pub mbit: f64,
    /// Round-trip time in milliseconds (each direction is delayed by half of it).
    pub rtt_ms: f64,
    /// Loss probability of each direction in percent.
    pub loss_pct: f64,
    /// Uniform jitter added to each direction's delay, in milliseconds (`0` keeps FIFO order).
    pub jitter_ms: f64,
}

/// The named profiles: (name, Mbit/s, RTT ms, loss %).
pub const NAMED: [(&str, f64, f64, f64); 5] = [
    ("fiber", 1000.0, 5.0, 0.0),
    ("ideal_6g", 10000.0, 1.0, 0.0),
    ("5g_urban", 100.0, 20.0, 0.1),
    ("cell_edge", 5.0, 120.0, 1.0),
    ("congested", 1.0, 200.0, 3.0),
];

impl Profile {
    /// One of the named profiles (`fiber`, `ideal_6g`, `5g_urban`, `cell_edge`, `congested`).
    pub fn named(name: &str) -> Result<Profile, NetlabError> {
        NAMED
            .iter()
            .find(|(n, ..)| *n == name)
            .map(|&(n, mbit, rtt_ms, loss_pct)| Profile {
                name: n.to_string(),
                mbit,
                rtt_ms,
                loss_pct,
                jitter_ms: 0.0,
            })
            .ok_or_else(|| {
                let names: Vec<&str> = NAMED.iter().map(|(n, ..)| *n).collect();
                NetlabError::Profile(format!(
                    "unknown profile '{name}' (known: {})",
                    names.join(", ")
                ))
            })
    }

    /// A custom profile from `MBIT,RTT_MS,LOSS_PCT` (for example `50,40,0`).
    pub fn parse_custom(spec: &str) -> Result<Profile, NetlabError> {
        let err = |what: &str| NetlabError::Profile(format!("--link '{spec}': {what}"));
        let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
        if parts.len() != 3 {
            return Err(err(
                "expected MBIT,RTT_MS,LOSS_PCT (three comma-separated numbers)",
            ));
        }
        let num = |s: &str, name: &str| -> Result<f64, NetlabError> {
            let v: f64 = s
                .parse()
                .map_err(|_| err(&format!("{name} must be a number")))?;
            if !v.is_finite() || v < 0.0 {
                return Err(err(&format!("{name} must be a finite number >= 0")));
            }
            Ok(v)
        };
        let mbit = num(parts[0], "MBIT")?;
        let rtt_ms = num(parts[1], "RTT_MS")?;
        let loss_pct = num(parts[2], "LOSS_PCT")?;
        if mbit <= 0.0 {
            return Err(err("MBIT must be > 0"));
        }
        if mbit > 100_000.0 {
            return Err(err("MBIT must be <= 100000"));
        }
        if rtt_ms > 60_000.0 {
            return Err(err("RTT_MS must be <= 60000"));
        }
        if loss_pct > 100.0 {
            return Err(err("LOSS_PCT must be <= 100"));
        }
        Ok(Profile {
            name: "custom".to_string(),
            mbit,
            rtt_ms,
            loss_pct,
            jitter_ms: 0.0,
        })
    }

    /// A copy with `jitter_ms` of uniform jitter on each direction (packets may then reorder).
    pub fn with_jitter(mut self, jitter_ms: f64) -> Profile {
        self.jitter_ms = jitter_ms.max(0.0);
        self
    }

    /// The one-way delay in milliseconds (half the RTT).
    pub fn one_way_ms(&self) -> f64 {
        self.rtt_ms / 2.0
    }

    /// The rate in bytes per second.
    pub fn rate_bytes(&self) -> f64 {
        self.mbit * 1e6 / 8.0
    }

    /// The bandwidth-delay product in bytes.
    pub fn bdp_bytes(&self) -> f64 {
        self.rate_bytes() * self.rtt_ms / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_profiles() {
        let p = Profile::named("5g_urban").unwrap();
        assert_eq!((p.mbit, p.rtt_ms, p.loss_pct), (100.0, 20.0, 0.1));
        assert_eq!(Profile::named("fiber").unwrap().rtt_ms, 5.0);
        assert_eq!(Profile::named("ideal_6g").unwrap().mbit, 10000.0);
        assert_eq!(Profile::named("cell_edge").unwrap().loss_pct, 1.0);
        assert_eq!(Profile::named("congested").unwrap().mbit, 1.0);
        let e = Profile::named("dialup").unwrap_err().to_string();
        assert!(
            e.contains("unknown profile 'dialup'") && e.contains("cell_edge"),
            "{e}"
        );
    }

    #[test]
    fn custom_profiles() {
        let p = Profile::parse_custom("50,40,0").unwrap();
        assert_eq!(
            (p.mbit, p.rtt_ms, p.loss_pct, p.jitter_ms),
            (50.0, 40.0, 0.0, 0.0)
        );
        assert_eq!(p.name, "custom");
        let p = Profile::parse_custom(" 2.5 , 120 , 1.5 ").unwrap();
        assert_eq!((p.mbit, p.rtt_ms, p.loss_pct), (2.5, 120.0, 1.5));
        assert_eq!(p.one_way_ms(), 60.0);
        assert_eq!(Profile::parse_custom("8,1000,0").unwrap().bdp_bytes(), 1e6);
    }

    #[test]
    fn custom_profile_errors() {
        let e = |s: &str| Profile::parse_custom(s).unwrap_err().to_string();
        assert_eq!(e("5,abc,1"), "--link '5,abc,1': RTT_MS must be a number");
        assert!(e("x,1,1").contains("MBIT must be a number"));
        assert!(e("5,1,y").contains("LOSS_PCT must be a number"));
        assert!(e("5,1").contains("expected MBIT,RTT_MS,LOSS_PCT"));
        assert!(e("5,1,1,1").contains("expected MBIT,RTT_MS,LOSS_PCT"));
        assert!(e("0,1,1").contains("MBIT must be > 0"));
        assert!(e("5,-1,1").contains("RTT_MS must be a finite number >= 0"));
        assert!(e("5,1,101").contains("LOSS_PCT must be <= 100"));
        assert!(e("5,nan,1").contains("RTT_MS must be a finite number"));
    }
}
