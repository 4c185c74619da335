//! Retention (`flr forget`): which restore points a policy keeps.
//!
//! The rules are restic's, applied per job (each job is its own group):
//! restore points are taken newest first; `last N` keeps the N newest;
//! each time bucket (`hourly`, `daily`, `weekly`, `monthly`, `yearly`)
//! with count N keeps the newest restore point of each of the N newest
//! periods that hold one. A restore point may be kept for several
//! reasons; one that no rule keeps is removed by deleting its manifest
//! (its chunks go at the next `flr prune`). A restore point that a live
//! reader lock serves (a mount, a restore) is kept as "mounted".
//!
//! Periods are in UTC, as restore point names are: a day runs from
//! 00:00Z, weeks are ISO 8601 weeks (Monday to Sunday).

use std::collections::HashSet;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::lock::{list_locks, LockKind};
use crate::repo::{Repository, RestorePointName};

/// How many restore points of each kind to keep (0: that rule is off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl KeepPolicy {
    pub fn keeps_nothing(&self) -> bool {
        *self == KeepPolicy::default()
    }
}

/// What the policy says about one restore point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub restore_point: String,
    /// Seconds since the Unix epoch (UTC) of the backup.
    pub time: i64,
    pub keep: bool,
    /// Why it is kept ("last 1", "daily 3", "mounted"); empty if removed.
    pub reasons: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct ForgetReport {
    pub dry_run: bool,
    pub keep: Vec<Decision>,
    pub remove: Vec<Decision>,
}

/// Decides for every restore point of `points` (any jobs, any order),
/// newest first within each job in the result. `mounted` holds restore
/// points (`job/name`) served by a live reader.
pub fn plan(
    points: &[(RestorePointName, i64)],
    policy: &KeepPolicy,
    mounted: &HashSet<String>,
) -> Vec<Decision> {
    let mut sorted: Vec<&(RestorePointName, i64)> = points.iter().collect();
    // By job, then newest first (the name breaks ties of equal times).
    sorted.sort_by(|a, b| {
        a.0.job
            .cmp(&b.0.job)
            .then(b.1.cmp(&a.1))
            .then(b.0.name.cmp(&a.0.name))
    });
    let mut out = Vec::with_capacity(sorted.len());
    for group in sorted.chunk_by(|a, b| a.0.job == b.0.job) {
        let mut reasons: Vec<Vec<String>> = vec![Vec::new(); group.len()];
        let rules: [Rule; 6] = [
            ("last", policy.last, |_| 0),
            ("hourly", policy.hourly, |t| t.div_euclid(3600)),
            ("daily", policy.daily, |t| t.div_euclid(86_400)),
            ("weekly", policy.weekly, iso_week),
            ("monthly", policy.monthly, |t| {
                let (y, m, _) = civil(t);
                y * 12 + m as i64
            }),
            ("yearly", policy.yearly, |t| civil(t).0),
        ];
        for (label, count, period) in rules {
            let mut kept = 0;
            let mut last_period = None;
            for (i, (_, time)) in group.iter().enumerate() {
                if kept == count {
                    break;
                }
                // "last" keeps every restore point until its count is
                // reached; a bucket only the first of each period.
                let p = period(*time);
                if label == "last" || last_period != Some(p) {
                    kept += 1;
                    reasons[i].push(format!("{label} {kept}"));
                    last_period = Some(p);
                }
            }
        }
        for ((name, time), mut why) in group.iter().map(|p| (&p.0, p.1)).zip(reasons) {
            let full = name.to_string();
            if mounted.contains(&full) {
                why.push("mounted".into());
            }
            out.push(Decision {
                restore_point: full,
                time,
                keep: !why.is_empty(),
                reasons: why,
            });
        }
    }
    out
}

/// A rule: its label, its count, and the period a time falls in.
type Rule = (&'static str, u32, fn(i64) -> i64);

/// (year, month, day) of a time in UTC.
fn civil(t: i64) -> (i64, u32, u32) {
    crate::manifest::civil_from_days(t.div_euclid(86_400))
}

/// The ISO 8601 week holding `t`, as year * 100 + week.
fn iso_week(t: i64) -> i64 {
    let days = t.div_euclid(86_400);
    // 1970-01-01 was a Thursday: weekday 0 is Monday.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let (year, _, _) = crate::manifest::civil_from_days(thursday);
    let jan1 = days_from_civil(year, 1, 1);
    year * 100 + (thursday - jan1) / 7 + 1
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The backup time a restore point's name gives (`YYYY-MM-DDTHH-MM-SSZ`).
fn time_of_name(name: &str) -> Option<i64> {
    let b = name.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| name.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    Some(days_from_civil(y, mo as u32, d as u32) * 86_400 + h * 3600 + mi * 60 + s)
}

/// Restore points named by live reader locks.
pub fn mounted_restore_points(repo: &Repository) -> Result<HashSet<String>> {
    Ok(list_locks(repo)?
        .into_iter()
        .filter(|l| !l.stale)
        .filter_map(|l| l.info)
        .filter(|i| i.kind == LockKind::Reader)
        .flat_map(|i| i.restore_points)
        .collect())
}

/// Applies `policy` to the restore points of `job` (all jobs if `None`),
/// deleting the manifests of those it does not keep unless `dry_run`.
pub fn forget(
    repo: &Repository,
    job: Option<&str>,
    policy: &KeepPolicy,
    dry_run: bool,
) -> Result<ForgetReport> {
    if policy.keeps_nothing() {
        return Err(Error::InvalidInput(
            "a retention policy needs at least one --keep-* option above 0 (it would remove every restore point)".into(),
        ));
    }
    let names = repo.list_restore_points(job)?;
    let mut points = Vec::with_capacity(names.len());
    for name in names {
        let time = match time_of_name(name.base()) {
            Some(t) => t,
            None => repo.load_manifest(&name)?.time,
        };
        points.push((name, time));
    }
    let mounted = mounted_restore_points(repo)?;
    let mut report = ForgetReport {
        dry_run,
        ..Default::default()
    };
    for d in plan(&points, policy, &mounted) {
        if d.keep {
            report.keep.push(d);
        } else {
            report.remove.push(d);
        }
    }
    if !dry_run {
        for d in &report.remove {
            let name = RestorePointName::parse(&d.restore_point)?;
            repo.delete_restore_point(&name)?;
            tracing::info!("forgot restore point {}", d.restore_point);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(y: i64, m: u32, d: u32, h: i64) -> i64 {
        days_from_civil(y, m, d) * 86_400 + h * 3600
    }

    fn points(times: &[i64]) -> Vec<(RestorePointName, i64)> {
        times
            .iter()
            .map(|&t| {
                (
                    RestorePointName {
                        job: "db".into(),
                        name: crate::manifest::timestamp_name(t),
                    },
                    t,
                )
            })
            .collect()
    }

    fn kept(decisions: &[Decision]) -> Vec<(String, Vec<String>)> {
        decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| (d.restore_point.clone(), d.reasons.clone()))
            .collect()
    }

    #[test]
    fn names_give_back_their_times() {
        for t in [0, 86_399, 951_782_400, 1_700_000_123, 4_102_444_800] {
            assert_eq!(time_of_name(&crate::manifest::timestamp_name(t)), Some(t));
        }
        assert_eq!(time_of_name("nightly"), None);
    }

    #[test]
    fn iso_weeks_follow_the_standard() {
        // 2021-01-03 (a Sunday) is in 2020's week 53; 2021-01-04 starts
        // week 1; 2024-12-30 (Monday) is in 2025's week 1.
        assert_eq!(iso_week(at(2021, 1, 3, 12)), 202_053);
        assert_eq!(iso_week(at(2021, 1, 4, 0)), 202_101);
        assert_eq!(iso_week(at(2024, 12, 30, 0)), 202_501);
        assert_eq!(iso_week(at(2024, 12, 29, 23)), 202_452);
    }

    #[test]
    fn last_and_daily_keep_the_newest_of_each_day() {
        // Three backups a day for four days.
        let mut times = Vec::new();
        for d in 1..=4 {
            for h in [1, 9, 17] {
                times.push(at(2026, 3, d, h));
            }
        }
        let policy = KeepPolicy {
            last: 2,
            daily: 3,
            ..Default::default()
        };
        let decisions = plan(&points(&times), &policy, &HashSet::new());
        assert_eq!(
            kept(&decisions),
            vec![
                (
                    "db/2026-03-04T17-00-00Z".into(),
                    vec!["last 1".into(), "daily 1".into()]
                ),
                ("db/2026-03-04T09-00-00Z".into(), vec!["last 2".into()]),
                ("db/2026-03-03T17-00-00Z".into(), vec!["daily 2".into()]),
                ("db/2026-03-02T17-00-00Z".into(), vec!["daily 3".into()]),
            ]
        );
        assert_eq!(decisions.iter().filter(|d| !d.keep).count(), 8);
    }

    #[test]
    fn weekly_monthly_yearly_and_mounted() {
        // One backup a day through 2025 and the start of 2026.
        let start = at(2025, 1, 1, 3);
        let times: Vec<i64> = (0..400).map(|d| start + d * 86_400).collect();
        let mut mounted = HashSet::new();
        mounted.insert(format!("db/{}", crate::manifest::timestamp_name(times[10])));
        let policy = KeepPolicy {
            weekly: 2,
            monthly: 2,
            yearly: 3,
            ..Default::default()
        };
        let decisions = plan(&points(&times), &policy, &mounted);
        let kept = kept(&decisions);
        let names: Vec<&str> = kept.iter().map(|(n, _)| n.as_str()).collect();
        // Newest is 2026-02-04 (Wednesday): weekly 1, monthly 1, yearly 1.
        assert_eq!(names[0], "db/2026-02-04T03-00-00Z");
        assert_eq!(kept[0].1, vec!["weekly 1", "monthly 1", "yearly 1"]);
        // The Sunday before closes the previous ISO week.
        assert!(kept.contains(&("db/2026-02-01T03-00-00Z".into(), vec!["weekly 2".into()])));
        assert!(kept.contains(&("db/2026-01-31T03-00-00Z".into(), vec!["monthly 2".into()])));
        assert!(kept.contains(&("db/2025-12-31T03-00-00Z".into(), vec!["yearly 2".into()])));
        assert!(kept.contains(&("db/2025-01-11T03-00-00Z".into(), vec!["mounted".into()])));
        assert_eq!(kept.len(), 5);
    }

    #[test]
    fn jobs_are_separate_groups() {
        let mut pts = points(&[100, 200, 300]);
        pts.extend(points(&[150, 250]).into_iter().map(|(mut n, t)| {
            n.job = "other".into();
            (n, t)
        }));
        let policy = KeepPolicy {
            last: 1,
            ..Default::default()
        };
        let kept = kept(&plan(&pts, &policy, &HashSet::new()));
        assert_eq!(kept.len(), 2);
        assert!(kept[0].0.ends_with("00-05-00Z"));
        assert!(kept[1].0.starts_with("other/") && kept[1].0.ends_with("00-04-10Z"));
    }

    proptest! {
        #[test]
        fn the_newest_is_always_kept_and_counts_are_bounded(
            mut times in proptest::collection::vec(0i64..200_000_000, 1..60),
            last in 0u32..4, hourly in 0u32..4, daily in 0u32..4,
            weekly in 0u32..4, monthly in 0u32..4, yearly in 0u32..4,
        ) {
            times.sort();
            times.dedup();
            let policy = KeepPolicy { last, hourly, daily, weekly, monthly, yearly };
            prop_assume!(!policy.keeps_nothing());
            let decisions = plan(&points(&times), &policy, &HashSet::new());
            prop_assert_eq!(decisions.len(), times.len());
            prop_assert!(decisions[0].keep, "the newest restore point is kept");
            let k = decisions.iter().filter(|d| d.keep).count() as u32;
            prop_assert!(k <= last + hourly + daily + weekly + monthly + yearly);
            // At most one restore point per day is kept for "daily".
            let daily_days: Vec<i64> = decisions.iter()
                .filter(|d| d.reasons.iter().any(|r| r.starts_with("daily")))
                .map(|d| d.time.div_euclid(86_400)).collect();
            let mut unique = daily_days.clone();
            unique.dedup();
            prop_assert_eq!(unique.len(), daily_days.len());
            prop_assert_eq!(daily_days.len() as u32, daily.min({
                let mut days: Vec<i64> = times.iter().map(|t| t.div_euclid(86_400)).collect();
                days.dedup();
                days.len() as u32
            }));
        }
    }
}
