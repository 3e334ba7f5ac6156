//! What `switchyard demo` shows: one row per rollout step — what goes where
//! (payloads per second to legacy, dual-write, Kafka only), rows in OLD and
//! NEW, the ingest lag and the offline-file backlog, the parity verdict.
//!
//! On a terminal the table is redrawn in place every second, with a footer
//! for the step under way. Anywhere else (a pipe, a file, a test) the output
//! is plain appended lines without escape sequences: a status line a second
//! under each step's heading, and the table once at the end.

use std::io::Write;
use std::time::{Duration, Instant};

use super::traffic::Counts;
use crate::compare::state::Status;

/// One rollout step: what the flags say.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub title: &'static str,
    /// The title in the table (at most 15 characters).
    pub short: &'static str,
    /// Dual-write percentage.
    pub dual: f64,
    /// Kafka-only percentage.
    pub kafka: f64,
    pub kill: bool,
}

impl Step {
    pub fn flags(&self) -> String {
        format!(
            "dual-write {}%, kafka-only {}%, kill switch {}",
            self.dual,
            self.kafka,
            if self.kill { "on" } else { "off" }
        )
    }
}

/// Parity windows by verdict, over every table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Windows {
    pub open: usize,
    pub ok: usize,
    pub pending: usize,
    pub mismatch: usize,
}

/// One look at the pipelines.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Seconds since the walk started.
    pub secs: u64,
    /// Payloads accepted since the previous sample (a second), per route.
    pub rate: Counts,
    /// Payloads accepted since the start.
    pub total: Counts,
    pub old_rows: i64,
    pub new_rows: i64,
    /// Messages on the topic the ingest consumer has not read yet.
    pub lag: i64,
    /// Closed offline files the loader has not loaded yet.
    pub backlog: i64,
    pub parity: Status,
    pub windows: Windows,
}

impl Sample {
    /// The status line of the plain output.
    pub fn line(&self) -> String {
        format!(
            "{:>4}s  legacy {:>5}/s  dual {:>5}/s  kafka {:>5}/s  │ OLD {:>7}  NEW {:>7} rows │ lag {:>5}  backlog {:>2} files │ parity {:<8} ok {:>3} pending {:>2} mismatch {:>2}",
            self.secs,
            self.rate.legacy,
            self.rate.dual,
            self.rate.kafka,
            self.old_rows,
            self.new_rows,
            self.lag,
            self.backlog,
            self.parity.as_str(),
            self.windows.ok,
            self.windows.pending,
            self.windows.mismatch,
        )
    }
}

/// What the pipelines still owe once the traffic has stopped.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// Rows OLD and NEW should end with: what the router accepted for them.
    pub old_expected: u64,
    pub new_expected: u64,
    /// Parity windows not settled yet (open or pending).
    pub unsettled: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Live,
    Done,
}

#[derive(Debug, Clone)]
struct Row {
    state: State,
    /// When the step began, and the tally then.
    began: Option<(Instant, Counts)>,
    /// Payloads per second over the whole step, once it is done.
    average: Option<Counts>,
    last: Option<Sample>,
}

enum Footer {
    None,
    Walking,
    Following,
    Draining(Drain),
}

pub struct View {
    steps: &'static [Step],
    phase: Duration,
    live: bool,
    color: bool,
    rows: Vec<Row>,
    current: Option<usize>,
    /// The latest sample once the traffic has stopped, and whether the
    /// pipelines have settled since (the table's last row).
    drained: Option<(State, Sample)>,
    footer: Footer,
    /// Lines of the frame last drawn (live view).
    drawn: usize,
}

/// Whether a terminal can take the live view: cursor movement and colour.
pub fn terminal_supports_live() -> (bool, bool) {
    let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    (!dumb, !dumb && !no_color)
}

const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const RED: &str = "\x1b[1;31m";
const CYAN: &str = "\x1b[1;36m";
const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

impl View {
    /// `live`: redraw a table in place (stdout is a terminal); `color`:
    /// with colours (live view only).
    pub fn new(steps: &'static [Step], phase: Duration, live: bool, color: bool) -> View {
        View {
            steps,
            phase,
            live,
            color: live && color,
            rows: vec![
                Row {
                    state: State::Waiting,
                    began: None,
                    average: None,
                    last: None,
                };
                steps.len()
            ],
            current: None,
            drained: None,
            footer: Footer::None,
            drawn: 0,
        }
    }

    /// Step `i` begins (the previous one, if any, ends) with the tally at `now`.
    pub fn begin_step(&mut self, out: &mut dyn Write, i: usize, now: Counts) {
        self.end_step(now);
        self.rows[i].state = State::Live;
        self.rows[i].began = Some((Instant::now(), now));
        self.current = Some(i);
        self.footer = Footer::Walking;
        if self.live {
            self.redraw(out);
        } else {
            let step = &self.steps[i];
            let _ = writeln!(
                out,
                "\n== step {}/{}: {} ({}) ==",
                i + 1,
                self.steps.len(),
                step.title,
                step.flags()
            );
        }
    }

    /// The step under way ends with the tally at `now`.
    pub fn end_step(&mut self, now: Counts) {
        let Some(i) = self.current.take() else {
            return;
        };
        let row = &mut self.rows[i];
        row.state = State::Done;
        if let Some((at, then)) = row.began {
            // A step cut short (Ctrl-C) counts as a second at least.
            let secs = at.elapsed().as_secs_f64().max(1.0);
            let per_sec = |a: u64, b: u64| ((a.saturating_sub(b)) as f64 / secs).round() as u64;
            row.average = Some(Counts {
                legacy: per_sec(now.legacy, then.legacy),
                dual: per_sec(now.dual, then.dual),
                kafka: per_sec(now.kafka, then.kafka),
                errors: per_sec(now.errors, then.errors),
            });
        }
    }

    /// A sample during the step under way.
    pub fn sample(&mut self, out: &mut dyn Write, s: Sample) {
        if self.live {
            if let Some(i) = self.current {
                self.rows[i].last = Some(s);
            }
            self.redraw(out);
        } else {
            let _ = writeln!(out, "{}", s.line());
            if let Some(i) = self.current {
                self.rows[i].last = Some(s);
            }
        }
    }

    /// The walk is over; the last step stays on until Ctrl-C.
    pub fn following(&mut self, out: &mut dyn Write) {
        self.footer = Footer::Following;
        if self.live {
            self.redraw(out);
        } else {
            let _ = writeln!(out, "\nfollowing (Ctrl-C to stop)…");
        }
    }

    /// The traffic has stopped; the pipelines drain and parity settles.
    pub fn draining(&mut self, out: &mut dyn Write, d: Drain, s: Sample) {
        let first = self.drained.is_none();
        self.drained = Some((State::Live, s));
        let last_title = self
            .rows
            .iter()
            .rposition(|r| r.state != State::Waiting)
            .map(|i| self.steps[i].title)
            .unwrap_or("the start");
        self.footer = Footer::Draining(d);
        if self.live {
            self.redraw(out);
        } else if first {
            let _ = writeln!(
                out,
                "\ntraffic stopped after \"{last_title}\"; letting the pipelines drain and parity settle…"
            );
        }
    }

    /// The last frame (live view), or the table once (plain output).
    pub fn finish(&mut self, out: &mut dyn Write) {
        self.footer = Footer::None;
        if let Some((state, _)) = &mut self.drained {
            *state = State::Done;
        }
        if self.live {
            self.redraw(out);
        } else {
            let _ = writeln!(out, "\n== per step ==");
            for line in self.table() {
                let _ = writeln!(out, "{line}");
            }
        }
    }

    /// Paints `text` (already padded) if colours are on.
    fn paint(&self, style: &str, text: &str) -> String {
        if self.color {
            format!("{style}{text}{RESET}")
        } else {
            text.to_string()
        }
    }

    /// The header and a row per step; at most 80 columns.
    fn table(&self) -> Vec<String> {
        let mut lines = vec![
            self.paint(
                DIM,
                format!(
                    "{:<19} {:^20} {:^15} {:^12}",
                    "", "payloads per second", "rows", "backlog"
                )
                .trim_end(),
            ),
            self.paint(
                BOLD,
                &format!(
                    "  {:<17} {:>6} {:>6} {:>6} {:>7} {:>7} {:>6} {:>5}  {}",
                    "step", "legacy", "dual", "kafka", "OLD", "NEW", "lag", "files", "parity"
                ),
            ),
        ];
        for (i, (step, row)) in self.steps.iter().zip(&self.rows).enumerate() {
            let head = format!("{} {:<15}", i + 1, step.short);
            let rate = match row.state {
                State::Done => row.average.or(row.last.as_ref().map(|s| s.rate)),
                _ => row.last.as_ref().map(|s| s.rate),
            };
            lines.push(self.row(row.state, &head, rate.zip(row.last.as_ref())));
        }
        if let Some((state, s)) = &self.drained {
            let head = format!("{:<17}", "traffic stopped");
            lines.push(self.row(*state, &head, Some((Counts::default(), s))));
        }
        lines
    }

    fn row(&self, state: State, head: &str, values: Option<(Counts, &Sample)>) -> String {
        let glyph = match state {
            State::Waiting => " ".to_string(),
            State::Live => self.paint(CYAN, "▶"),
            State::Done => self.paint(GREEN, "✓"),
        };
        match (state, values) {
            (State::Waiting, _) => format!("{glyph} {}", self.paint(DIM, head)),
            (_, Some((r, s))) => {
                let (verdict, style) = match s.parity {
                    Status::Ok => ("ok", GREEN),
                    Status::Open => ("open", DIM),
                    Status::Pending => ("pending", YELLOW),
                    Status::Mismatch => ("mismatch", RED),
                };
                format!(
                    "{glyph} {head} {:>6} {:>6} {:>6} {:>7} {:>7} {:>6} {:>5}  {}",
                    r.legacy,
                    r.dual,
                    r.kafka,
                    s.old_rows,
                    s.new_rows,
                    s.lag,
                    s.backlog,
                    self.paint(style, verdict)
                )
            }
            (_, None) => format!("{glyph} {head} {:>6}", "…"),
        }
    }

    fn footer_lines(&self) -> Vec<String> {
        let last = self
            .drained
            .as_ref()
            .map(|(_, s)| s)
            .or_else(|| self.current.and_then(|i| self.rows[i].last.as_ref()))
            .or_else(|| self.rows.iter().rev().find_map(|r| r.last.as_ref()));
        let totals = |s: &Sample| {
            let w = s.windows;
            format!(
                "  {} accepted, {} refused · parity windows: {} ok, {} pending, {} mismatch",
                s.total.accepted(),
                s.total.errors,
                w.ok,
                w.pending,
                w.mismatch,
            )
        };
        match (&self.footer, self.current) {
            (Footer::None, _) => vec![],
            (Footer::Walking | Footer::Following, Some(i)) => {
                let step = &self.steps[i];
                let secs = last.map(|s| s.secs).unwrap_or(0);
                let when = if matches!(self.footer, Footer::Following) {
                    "until Ctrl-C".to_string()
                } else {
                    let left = self.rows[i]
                        .began
                        .map(|(at, _)| self.phase.saturating_sub(at.elapsed()))
                        .unwrap_or_default();
                    format!("{}s left", left.as_secs_f64().round() as u64)
                };
                let mut v = vec![format!("  {secs}s  flags: {} · {when}", step.flags())];
                v.extend(last.map(totals));
                v
            }
            (Footer::Walking | Footer::Following, None) => vec![],
            (Footer::Draining(d), _) => {
                let (old_rows, new_rows) = last.map(|s| (s.old_rows, s.new_rows)).unwrap_or((0, 0));
                let mut v = vec![format!(
                    "  draining: rows OLD {old_rows}/{}, NEW {new_rows}/{} · {} window{} to settle",
                    d.old_expected,
                    d.new_expected,
                    d.unsettled,
                    if d.unsettled == 1 { "" } else { "s" }
                )];
                v.extend(last.map(totals));
                v
            }
        }
    }

    /// Draws the table and footer over the previous frame. Wrapping is off
    /// while drawing (a row wider than the terminal is cut, never wrapped),
    /// so the cursor goes back exactly as many lines as were drawn.
    fn redraw(&mut self, out: &mut dyn Write) {
        let mut lines = self.table();
        let footer = self.footer_lines();
        if !footer.is_empty() {
            lines.push(String::new());
            lines.extend(footer);
        }
        let mut frame = String::new();
        if self.drawn > 0 {
            frame.push_str(&format!("\r\x1b[{}A", self.drawn));
        }
        frame.push_str("\x1b[?7l");
        for line in &lines {
            frame.push_str(line);
            frame.push_str("\x1b[K\n");
        }
        frame.push_str("\x1b[J\x1b[?7h");
        self.drawn = lines.len();
        let _ = out.write_all(frame.as_bytes());
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo's first and last steps.
    const STEPS: [Step; 2] = [crate::demo::PHASES[0], crate::demo::PHASES[4]];

    fn sample(secs: u64, legacy: u64) -> Sample {
        Sample {
            secs,
            rate: Counts {
                legacy,
                ..Counts::default()
            },
            total: Counts {
                legacy: legacy * secs,
                ..Counts::default()
            },
            old_rows: 123_456,
            new_rows: 7,
            lag: 12,
            backlog: 3,
            parity: Status::Mismatch,
            windows: Windows::default(),
        }
    }

    #[test]
    fn plain_output_has_no_escape_sequences_and_fits_80_columns() {
        let mut view = View::new(&STEPS, Duration::from_secs(1), false, true);
        let mut out = Vec::new();
        view.begin_step(&mut out, 0, Counts::default());
        view.sample(&mut out, sample(1, 200));
        view.begin_step(&mut out, 1, Counts::default());
        view.sample(&mut out, sample(2, 100));
        view.end_step(Counts::default());
        let mut settled = sample(3, 0);
        settled.parity = Status::Ok;
        view.draining(
            &mut out,
            Drain {
                old_expected: 2,
                new_expected: 0,
                unsettled: 1,
            },
            settled,
        );
        view.finish(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains('\x1b'), "{text}");
        assert!(text.contains("== step 2/2: kill switch: everything legacy (dual-write 50%, kafka-only 10%, kill switch on) =="), "{text}");
        assert!(text.contains("legacy   100/s  dual     0/s"), "{text}");
        assert!(text.contains("traffic stopped after \"kill switch: everything legacy\""));
        let table: Vec<&str> = text
            .lines()
            .skip_while(|l| *l != "== per step ==")
            .skip(1)
            .collect();
        assert_eq!(table.len(), 5, "{text}");
        for line in &table {
            assert!(line.chars().count() <= 80, "{line:?}");
        }
        assert!(table[3].starts_with("✓ 2 kill switch") && table[3].ends_with("mismatch"));
        assert!(table[4].starts_with("✓ traffic stopped ") && table[4].ends_with(" ok"));
    }

    #[test]
    fn the_live_view_redraws_over_the_previous_frame() {
        let mut view = View::new(&STEPS, Duration::from_secs(5), true, false);
        let mut out = Vec::new();
        view.begin_step(&mut out, 0, Counts::default());
        let first = String::from_utf8(std::mem::take(&mut out)).unwrap();
        assert!(!first.contains("\x1b[4A"));
        view.sample(&mut out, sample(1, 200));
        let second = String::from_utf8(out).unwrap();
        // Back over the first frame: two header lines, two steps, a blank
        // line and the footer (no totals before the first sample).
        assert!(second.starts_with("\r\x1b[6A\x1b[?7l"), "{second:?}");
        assert!(second.ends_with("\x1b[J\x1b[?7h"), "{second:?}");
        assert!(second.contains("▶ 1 legacy only"), "{second:?}");
        assert!(second.contains("1s  flags: dual-write 0%"), "{second:?}");
        // No colours when told so.
        assert!(!second.contains("\x1b[32m") && !second.contains("\x1b[0m"));
    }

    /// Drops escape sequences (CSI: ESC [ parameters, a final letter).
    fn visible(s: &str) -> String {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                chars.find(|c| c.is_ascii_alphabetic());
            } else {
                out.push(c);
            }
        }
        out
    }

    #[test]
    fn every_live_frame_fits_80_columns() {
        let mut view = View::new(&STEPS, Duration::from_secs(30), true, true);
        let mut out = Vec::new();
        let mut big = sample(3599, 99_999);
        big.new_rows = 9_999_999;
        big.lag = 999_999;
        big.total.legacy = 9_999_999;
        big.windows = Windows {
            open: 9,
            ok: 9999,
            pending: 9,
            mismatch: 9,
        };
        view.begin_step(&mut out, 1, Counts::default());
        view.sample(&mut out, big.clone());
        view.following(&mut out);
        view.end_step(Counts {
            legacy: 99_999 * 30,
            ..Counts::default()
        });
        view.draining(
            &mut out,
            Drain {
                old_expected: 9_999_999,
                new_expected: 9_999_999,
                unsettled: 99,
            },
            big,
        );
        view.finish(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\x1b[32m✓\x1b[0m"), "colours on: {text:?}");
        for line in visible(&text).lines() {
            assert!(line.chars().count() <= 80, "{line:?}");
        }
    }
}
