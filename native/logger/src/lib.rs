//! fsb-logger's core, without any file descriptors of the shim in sight (so it can be tested).
//!
//! Why it is shaped this way:
//! - Output is CRI's log format (`<RFC3339Nano UTC> <stdout|stderr> <F|P> <content>\n`), the one
//!   kubelet and every log shipper already read, so stdout and stderr stay apart in one file and
//!   every line carries the time it arrived. All lines of one read share that read's timestamp.
//! - A line longer than `max_line` is cut into `P` (partial) records ending with an `F` one; a
//!   line still open after a short idle time is written as `P` too, so a prompt without a newline
//!   shows up instead of waiting for one that may never come.
//! - The cap: the file is renamed to `<path>.1` (replacing the older one) when the next write
//!   would take it past half the cap, so the two files together never exceed the cap and the
//!   newest output is what is kept.
//! - Never block or kill the container: a failed write (disk full) drops that data, counts it,
//!   and says so in the log (one `stderr` line from fsb-logger) once writing works again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024;
pub const DEFAULT_MAX_LINE: usize = 16 * 1024;
/// The smallest cap honoured: two halves that each hold a few full-length records.
pub const MIN_MAX_BYTES: u64 = 8 * 1024;
/// Room for a record's header: timestamp (30) + stream (6) + tag + separators and newline.
const HEADER_BYTES: usize = 48;

pub const STDOUT: usize = 0;
pub const STDERR: usize = 1;
const STREAM_NAMES: [&str; 2] = ["stdout", "stderr"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub max_line: usize,
}

/// Arguments come from the `binary://` URI's query, as `key value` pairs in no fixed order
/// (containerd iterates a Go map). Keys may carry leading dashes.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Config, String> {
    let mut path = None;
    let mut max_bytes = DEFAULT_MAX_BYTES;
    let mut max_line = DEFAULT_MAX_LINE;
    let mut it = args.into_iter();
    while let Some(key) = it.next() {
        let name = key.trim_start_matches('-').to_string();
        let value = it
            .next()
            .ok_or_else(|| format!("argument {key}: missing its value"))?;
        match name.as_str() {
            "path" => path = Some(PathBuf::from(value)),
            "max-bytes" => {
                max_bytes = value
                    .parse()
                    .map_err(|_| format!("max-bytes {value:?}: not a number of bytes"))?
            }
            "max-line" => {
                max_line = value
                    .parse()
                    .map_err(|_| format!("max-line {value:?}: not a number of bytes"))?
            }
            _ => {
                return Err(format!(
                    "unknown argument {key:?} (known: path, max-bytes, max-line)"
                ))
            }
        }
    }
    let path = path.ok_or("argument path: required (the log file to write)")?;
    if !path.is_absolute() {
        return Err(format!("path {}: must be absolute", path.display()));
    }
    let max_bytes = max_bytes.max(MIN_MAX_BYTES);
    // A record must fit in half the cap, or no rotation could keep the total under it.
    let room = (max_bytes / 2) as usize / 4;
    let max_line = max_line.clamp(1, room.max(1));
    Ok(Config {
        path,
        max_bytes,
        max_line,
    })
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`: RFC 3339 in UTC with all nine fraction digits.
pub fn format_timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar, counting in
/// 400-year eras that start on 1 March (so the leap day is the last day of its year).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the March-based year
    let mp = (5 * doy + 2) / 153; // month, March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn push_record(out: &mut Vec<u8>, ts: &str, stream: usize, partial: bool, content: &[u8]) {
    out.extend_from_slice(ts.as_bytes());
    out.push(b' ');
    out.extend_from_slice(STREAM_NAMES[stream].as_bytes());
    out.extend_from_slice(if partial { b" P " } else { b" F " });
    out.extend_from_slice(content);
    out.push(b'\n');
}

/// The capped log file: `path` plus at most one older `path.1`, together at most `max_bytes`.
pub struct LogFile {
    path: PathBuf,
    rotated: PathBuf,
    half: u64,
    file: Option<File>,
    size: u64,
    /// Bytes of records dropped since the start, and since the last note in the log.
    pub dropped_total: u64,
    dropped_unreported: u64,
    last_error: String,
}

impl LogFile {
    pub fn open(path: &Path, max_bytes: u64) -> LogFile {
        let mut rotated = path.as_os_str().to_owned();
        rotated.push(".1");
        let mut log = LogFile {
            path: path.to_path_buf(),
            rotated: PathBuf::from(rotated),
            half: max_bytes / 2,
            file: None,
            size: 0,
            dropped_total: 0,
            dropped_unreported: 0,
            last_error: String::new(),
        };
        if let Err(err) = log.reopen() {
            log.note_error("open", &err);
        }
        log
    }

    fn reopen(&mut self) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = Some(file);
        Ok(())
    }

    fn note_error(&mut self, what: &str, err: &io::Error) {
        let text = format!("{what} {}: {err}", self.path.display());
        if text != self.last_error {
            eprintln!("fsb-logger: {text}; dropping output until it works again");
            self.last_error = text;
        }
    }

    /// Rename the file to `.1` and start an empty one. Should the rename fail, the file is
    /// emptied instead: losing old output is better than passing the cap.
    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        if let Err(err) = fs::rename(&self.path, &self.rotated) {
            if err.kind() != io::ErrorKind::NotFound {
                self.note_error("rotate", &err);
                OpenOptions::new()
                    .write(true)
                    .open(&self.path)?
                    .set_len(0)?;
            }
        }
        self.reopen()
    }

    /// Append whole records (`buf` ends with a newline); `buf` must fit in half the cap.
    fn append(&mut self, buf: &[u8]) {
        if buf.is_empty() {
            return;
        }
        if self.file.is_none() {
            if let Err(err) = self.reopen() {
                self.note_error("open", &err);
            }
        }
        if self.size > 0 && self.size + buf.len() as u64 > self.half {
            if let Err(err) = self.rotate() {
                self.note_error("rotate", &err);
            }
        }
        let Some(file) = self.file.as_mut() else {
            self.drop_bytes(buf.len());
            return;
        };
        match file.write_all(buf) {
            Ok(()) => self.size += buf.len() as u64,
            Err(err) => {
                // A short write left part of a record: cut it off, so the next record starts
                // on a line of its own.
                if file.set_len(self.size).is_err() {
                    self.size = file.metadata().map(|m| m.len()).unwrap_or(self.size);
                }
                self.note_error("write", &err);
                self.drop_bytes(buf.len());
            }
        }
    }

    fn drop_bytes(&mut self, n: usize) {
        self.dropped_total += n as u64;
        self.dropped_unreported += n as u64;
    }

    /// After a gap: one line telling the reader how much is missing. It is written before the
    /// data that follows the gap, and counted like any record.
    fn report_drops(&mut self, ts: &str) {
        let unreported = self.dropped_unreported;
        if unreported == 0 {
            return;
        }
        let note = format!(
            "fsb-logger: {unreported} bytes of output were dropped ({})",
            self.last_error
        );
        let mut rec = Vec::new();
        push_record(&mut rec, ts, STDERR, false, note.as_bytes());
        let before = self.dropped_total;
        self.dropped_unreported = 0;
        self.append(&rec);
        if self.dropped_total == before {
            self.last_error.clear();
        } else {
            // Still failing: the note itself is not output to count; try again next time.
            self.dropped_total = before;
            self.dropped_unreported = unreported;
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Turns the bytes read from each stream into records, written in batches (one write per batch,
/// each batch within one half of the cap).
pub struct Logger {
    pub file: LogFile,
    max_line: usize,
    pending: [Vec<u8>; 2],
    batch: Vec<u8>,
}

impl Logger {
    pub fn new(config: &Config) -> Logger {
        Logger {
            file: LogFile::open(&config.path, config.max_bytes),
            max_line: config.max_line,
            pending: [Vec::new(), Vec::new()],
            batch: Vec::with_capacity(64 * 1024),
        }
    }

    /// Whether `stream` holds the start of a line that no newline has ended yet.
    pub fn has_pending(&self, stream: usize) -> bool {
        !self.pending[stream].is_empty()
    }

    fn record(&mut self, ts: &str, stream: usize, partial: bool, content: &[u8]) {
        let len = content.len() + HEADER_BYTES;
        if !self.batch.is_empty()
            && self.file.size + (self.batch.len() + len) as u64 > self.file.half
        {
            self.flush_batch();
        }
        push_record(&mut self.batch, ts, stream, partial, content);
    }

    fn flush_batch(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        self.file.append(&batch);
        self.batch = batch;
        self.batch.clear();
    }

    /// Bytes read from `stream` at time `now`.
    pub fn input(&mut self, stream: usize, data: &[u8], now: SystemTime) {
        let ts = format_timestamp(now);
        self.file.report_drops(&ts);
        let mut pending = std::mem::take(&mut self.pending[stream]);
        pending.extend_from_slice(data);
        let mut start = 0;
        while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
            let mut line = &pending[start..start + nl];
            while line.len() > self.max_line {
                self.record(&ts, stream, true, &line[..self.max_line]);
                line = &line[self.max_line..];
            }
            self.record(&ts, stream, false, line);
            start += nl + 1;
        }
        while pending.len() - start >= self.max_line {
            self.record(&ts, stream, true, &pending[start..start + self.max_line]);
            start += self.max_line;
        }
        pending.drain(..start);
        self.pending[stream] = pending;
        self.flush_batch();
    }

    /// Write what `stream` holds of an unfinished line as a partial record (idle or at the end).
    pub fn flush_partial(&mut self, stream: usize, now: SystemTime) {
        if self.pending[stream].is_empty() {
            return;
        }
        let ts = format_timestamp(now);
        self.file.report_drops(&ts);
        let pending = std::mem::take(&mut self.pending[stream]);
        self.record(&ts, stream, true, &pending);
        self.flush_batch();
        self.pending[stream] = pending;
        self.pending[stream].clear();
    }
}

#[cfg(test)]
mod tests;
