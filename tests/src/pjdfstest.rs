//! pjdfstest, the POSIX file system test suite: its configuration, a run
//! in one directory, and its report parsed into one outcome per test case.
//!
//! The report is one line per case, `NAME<padding> OUTCOME`, where the
//! outcome is `ok`, `FAILED`, `skipped`, `failed as expected` or `PASSED
//! UNEXPECTEDLY`; lines indented with a tab below a case say why it failed
//! or was skipped. A last line counts them all: `Summary: F failed, S
//! skipped, P passed, E expected failures, T total`.

use std::fmt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::command::{run_with, tool, Run};
use crate::tools::PJDFSTEST;

/// The suite takes seconds on a local disk; its many short sleeps and
/// round trips take longer on a FUSE mount.
const PJDFSTEST_TIMEOUT: Duration = Duration::from_secs(600);

/// The second user pjdfstest switches to (the first is `nobody`), with a
/// group of the same name; scripts/setup.sh creates both.
pub const SECOND_USER: &str = "flrtest";

/// How long pjdfstest sleeps between two changes whose timestamps it
/// compares: comfortably above any timestamp granularity (the coarse
/// clock that stamps files ticks every few milliseconds).
const NAPTIME_SECONDS: f64 = 0.05;

/// The opt-in features every writable Linux filesystem is expected to
/// have. `posix_fallocate` works everywhere: glibc writes zeros when the
/// filesystem has no fallocate.
const FEATURES: &[&str] = &["posix_fallocate", "rename_ctime", "utime_now", "utimensat"];

/// How one test case ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
    Skipped,
    /// Failed, and listed in the configuration's `expected_failures`.
    FailedAsExpected,
    /// Passed although listed in `expected_failures`.
    PassedUnexpectedly,
}

impl Outcome {
    /// The words pjdfstest prints for each outcome.
    const WORDS: [(&'static str, Outcome); 5] = [
        ("ok", Outcome::Passed),
        ("FAILED", Outcome::Failed),
        ("skipped", Outcome::Skipped),
        ("failed as expected", Outcome::FailedAsExpected),
        ("PASSED UNEXPECTEDLY", Outcome::PassedUnexpectedly),
    ];
}

/// One test case: `syscall::what[::file type]`, how it ended, and the
/// indented lines pjdfstest printed below it (the failed assertion, or
/// the reason for a skip).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    pub name: String,
    pub outcome: Outcome,
    pub details: Vec<String>,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", self.name, self.outcome)?;
        for line in &self.details {
            write!(f, "\n    {line}")?;
        }
        Ok(())
    }
}

/// The counts of pjdfstest's summary line. Its "failed" count includes
/// the unexpected passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub failed: usize,
    pub skipped: usize,
    pub passed: usize,
    pub expected_failures: usize,
    pub total: usize,
}

/// A parsed pjdfstest report.
#[derive(Debug)]
pub struct Report {
    pub cases: Vec<Case>,
    pub summary: Summary,
}

impl Report {
    /// The cases that ended with `outcome`.
    pub fn with(&self, outcome: Outcome) -> impl Iterator<Item = &Case> {
        self.cases.iter().filter(move |c| c.outcome == outcome)
    }

    pub fn count(&self, outcome: Outcome) -> usize {
        self.with(outcome).count()
    }
}

/// Removes the ANSI colour sequences (`ESC [ ... m`) pjdfstest adds when
/// it thinks it writes to a terminal.
fn strip_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses `Summary: 1 failed, 2 skipped, 3 passed, 0 expected failures,
/// 6 total`.
fn parse_summary(line: &str) -> Option<Summary> {
    let counts = line.strip_prefix("Summary:")?;
    let mut summary = Summary::default();
    let mut seen = 0;
    for part in counts.split(',') {
        let (number, label) = part.trim().split_once(' ')?;
        let number: usize = number.parse().ok()?;
        let slot = match label {
            "failed" => &mut summary.failed,
            "skipped" => &mut summary.skipped,
            "passed" => &mut summary.passed,
            "expected failures" => &mut summary.expected_failures,
            "total" => &mut summary.total,
            _ => return None,
        };
        *slot = number;
        seen += 1;
    }
    (seen == 5).then_some(summary)
}

/// Parses pjdfstest's standard output. Errors name the line that does not
/// fit, or a summary that disagrees with the cases listed.
pub fn parse_report(stdout: &str) -> Result<Report, String> {
    let text = strip_colours(stdout);
    let mut cases: Vec<Case> = Vec::new();
    let mut summary = None;
    for line in text.lines() {
        if let Some(detail) = line.strip_prefix('\t') {
            match cases.last_mut() {
                Some(case) => case.details.push(detail.to_string()),
                None => return Err(format!("detail before any test case: {line:?}")),
            }
            continue;
        }
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if line.starts_with("Summary:") {
            summary = Some(parse_summary(line).ok_or_else(|| format!("bad summary: {line:?}"))?);
            continue;
        }
        // With RUST_BACKTRACE set, a failure's backtrace follows it on
        // lines of its own; they belong to the case above.
        if line.starts_with(' ') || line == "Backtrace:" {
            if let Some(case) = cases.last_mut() {
                case.details.push(line.to_string());
                continue;
            }
        }
        let case = Outcome::WORDS.iter().find_map(|(word, outcome)| {
            let name = line.strip_suffix(word)?;
            // The name is padded with spaces, and at least one separates
            // it from the outcome.
            (name.ends_with(' ') && !name.trim().contains(' ')).then(|| Case {
                name: name.trim().to_string(),
                outcome: *outcome,
                details: Vec::new(),
            })
        });
        match case {
            Some(case) => cases.push(case),
            None => return Err(format!("not a pjdfstest result line: {line:?}")),
        }
    }
    let summary = summary.ok_or("no summary line")?;
    let report = Report { cases, summary };
    let listed = Summary {
        failed: report.count(Outcome::Failed) + report.count(Outcome::PassedUnexpectedly),
        skipped: report.count(Outcome::Skipped),
        passed: report.count(Outcome::Passed),
        expected_failures: report.count(Outcome::FailedAsExpected),
        total: report.cases.len(),
    };
    if listed != report.summary {
        return Err(format!(
            "the summary {:?} disagrees with the {} cases listed {listed:?}",
            report.summary,
            report.cases.len()
        ));
    }
    Ok(report)
}

/// The primary group of `user`, panicking with how to create the user
/// when it does not exist.
#[track_caller]
fn primary_group(user: &str) -> String {
    let r = tool("id", ["-gn", user]);
    assert!(
        r.status.success(),
        "pjdfstest needs the user {user:?} (scripts/setup.sh creates it): {r}"
    );
    r.stdout.trim().to_string()
}

/// The configuration file's text: the features, the sleep between
/// timestamp comparisons, and the two users (each with its primary
/// group, as pjdfstest requires) the suite switches to.
fn config() -> String {
    let mut toml = String::from("[features]\n");
    for feature in FEATURES {
        toml.push_str(&format!("{feature} = {{}}\n"));
    }
    toml.push_str(&format!("\n[settings]\nnaptime = {NAPTIME_SECONDS}\n"));
    // Remounting read-only (for the EROFS cases) is not ours to do.
    toml.push_str("allow_remount = false\n\n[dummy_auth]\nentries = [\n");
    for user in ["nobody", SECOND_USER] {
        toml.push_str(&format!("    [{user:?}, {:?}],\n", primary_group(user)));
    }
    toml.push_str("]\n");
    toml
}

/// A finished pjdfstest run: the process and its parsed report.
pub struct PjdfstestRun {
    pub run: Run,
    pub report: Report,
}

/// Runs the whole suite as root in `dir` (it makes a temporary directory
/// there and removes it at the end), with `secondary_fs` (a directory on
/// another filesystem) for the cross-device cases and its configuration
/// file written to `config_dir`. Panics if the report cannot be parsed.
#[track_caller]
pub fn run_suite(dir: &Path, secondary_fs: &Path, config_dir: &Path) -> PjdfstestRun {
    crate::mkdir(config_dir);
    let config_file = config_dir.join("pjdfstest.toml");
    std::fs::write(&config_file, config())
        .unwrap_or_else(|e| panic!("write {}: {e}", config_file.display()));
    let mut cmd = Command::new(PJDFSTEST.path());
    cmd.arg("-c")
        .arg(&config_file)
        .arg("-p")
        .arg(dir)
        .arg("-s")
        .arg(secondary_fs)
        .env("NO_COLOR", "1")
        // The failed assertion says enough; backtraces of the suite's own
        // code would bury it.
        .env("RUST_BACKTRACE", "0");
    let run = run_with(&mut cmd, None, PJDFSTEST_TIMEOUT);
    let report = parse_report(&run.stdout)
        .unwrap_or_else(|e| panic!("cannot read the pjdfstest report ({e}): {run}"));
    PjdfstestRun { run, report }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
chmod::update_ctime                                                          ok
open::changed_time_fields_success                                         FAILED
\tTimestamps did not change as expected
link::link_count_max                                                     skipped
\tCannot get value for LINK_MAX: filesystem limit is unknown
utimensat::y2038                                             failed as expected
a::name::that::is::longer::than::the::column::where::outcomes::start::usually ok
rename::exdev                                                PASSED UNEXPECTEDLY

Summary: 2 failed, 1 skipped, 2 passed, 1 expected failures, 6 total
";

    #[test]
    fn parses_every_outcome_and_its_details() {
        let report = parse_report(SAMPLE).unwrap();
        let outcomes: Vec<(&str, Outcome)> = report
            .cases
            .iter()
            .map(|c| (c.name.as_str(), c.outcome))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("chmod::update_ctime", Outcome::Passed),
                ("open::changed_time_fields_success", Outcome::Failed),
                ("link::link_count_max", Outcome::Skipped),
                ("utimensat::y2038", Outcome::FailedAsExpected),
                (
                    "a::name::that::is::longer::than::the::column::where::outcomes::start::usually",
                    Outcome::Passed
                ),
                ("rename::exdev", Outcome::PassedUnexpectedly),
            ]
        );
        assert_eq!(
            report.cases[1].details,
            ["Timestamps did not change as expected"]
        );
        assert_eq!(
            report.summary,
            Summary {
                failed: 2,
                skipped: 1,
                passed: 2,
                expected_failures: 1,
                total: 6
            }
        );
    }

    #[test]
    fn strips_colours() {
        let coloured = "\u{1b}[34mchmod::update_ctime\u{1b}[0m \u{1b}[32mok\u{1b}[0m\n\n\
                        \u{1b}[1;32mSummary\u{1b}[0m: 0 \u{1b}[1;31mfailed\u{1b}[0m, 0 skipped, \
                        1 passed, 0 expected failures, 1 total\n";
        let report = parse_report(coloured).unwrap();
        assert_eq!(report.cases[0].name, "chmod::update_ctime");
        assert_eq!(report.summary.passed, 1);
    }

    #[test]
    fn keeps_backtraces_with_their_case() {
        let text = "\
open::x                                                                   FAILED
\tboom
Backtrace:
   0: pjdfstest::main

Summary: 1 failed, 0 skipped, 0 passed, 0 expected failures, 1 total
";
        let report = parse_report(text).unwrap();
        assert_eq!(report.cases.len(), 1);
        assert_eq!(report.cases[0].details.len(), 3);
    }

    #[test]
    fn refuses_a_summary_that_disagrees_or_is_missing() {
        let wrong = "chmod::a  ok\n\nSummary: 0 failed, 0 skipped, 2 passed, 0 expected failures, 2 total\n";
        assert!(parse_report(wrong).unwrap_err().contains("disagrees"));
        assert!(parse_report("chmod::a  ok\n").is_err());
        assert!(parse_report("thread 'main' panicked\n").is_err());
    }
}
