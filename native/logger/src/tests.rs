use super::*;
use std::fs;
use std::time::{Duration, UNIX_EPOCH};

fn at(secs: u64, nanos: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, nanos)
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("fsb-logger-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn config(dir: &TempDir, max_bytes: u64, max_line: usize) -> Config {
    Config {
        path: dir.0.join("sb.log"),
        max_bytes,
        max_line,
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn timestamps_are_rfc3339_utc_with_nanoseconds() {
    assert_eq!(format_timestamp(at(0, 0)), "1970-01-01T00:00:00.000000000Z");
    assert_eq!(
        format_timestamp(at(951_782_400, 5)),
        "2000-02-29T00:00:00.000000005Z"
    );
    assert_eq!(
        format_timestamp(at(1_796_158_593, 123_456_789)),
        "2026-12-01T20:56:33.123456789Z"
    );
    assert_eq!(
        format_timestamp(at(4_102_444_799, 999_999_999)),
        "2099-12-31T23:59:59.999999999Z"
    );
}

#[test]
fn args_come_in_any_order_and_are_checked() {
    let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let c = parse_args(args(&["max-bytes", "65536", "path", "/x/sb.log"])).unwrap();
    assert_eq!(
        c,
        Config {
            path: "/x/sb.log".into(),
            max_bytes: 65536,
            max_line: DEFAULT_MAX_LINE / 2
        }
    );
    let c = parse_args(args(&["--path", "/x/sb.log"])).unwrap();
    assert_eq!(
        (c.max_bytes, c.max_line),
        (DEFAULT_MAX_BYTES, DEFAULT_MAX_LINE)
    );
    assert!(parse_args(args(&["max-bytes", "1"]))
        .unwrap_err()
        .contains("path"));
    assert!(parse_args(args(&["path", "rel.log"]))
        .unwrap_err()
        .contains("absolute"));
    assert!(parse_args(args(&["path", "/a", "max-bytes", "ten"]))
        .unwrap_err()
        .contains("max-bytes"));
    assert!(parse_args(args(&["path", "/a", "colour", "red"]))
        .unwrap_err()
        .contains("colour"));
    assert!(parse_args(args(&["path"])).unwrap_err().contains("value"));
}

#[test]
fn lines_are_written_per_stream_with_the_read_time() {
    let dir = TempDir::new("format");
    let mut logger = Logger::new(&config(&dir, DEFAULT_MAX_BYTES, DEFAULT_MAX_LINE));
    logger.input(STDOUT, b"one\ntwo\n", at(1, 0));
    logger.input(STDERR, b"oops\n", at(2, 500));
    logger.input(STDOUT, b"\n", at(3, 0));
    assert_eq!(
        read(&dir.0.join("sb.log")),
        "1970-01-01T00:00:01.000000000Z stdout F one\n\
         1970-01-01T00:00:01.000000000Z stdout F two\n\
         1970-01-01T00:00:02.000000500Z stderr F oops\n\
         1970-01-01T00:00:03.000000000Z stdout F \n"
    );
}

#[test]
fn long_and_unfinished_lines_become_partial_records() {
    let dir = TempDir::new("partial");
    let mut logger = Logger::new(&config(&dir, DEFAULT_MAX_BYTES, 4));
    logger.input(STDOUT, b"abcdefghij\nxy", at(0, 0));
    assert!(logger.has_pending(STDOUT));
    logger.input(STDERR, b"err", at(0, 0));
    logger.input(STDOUT, b"z", at(1, 0));
    logger.flush_partial(STDOUT, at(2, 0)); // idle: written as it is
    assert!(!logger.has_pending(STDOUT));
    logger.input(STDOUT, b"!\n", at(3, 0));
    logger.flush_partial(STDERR, at(4, 0)); // end of stream
    let ts = |s: u64| format_timestamp(at(s, 0));
    assert_eq!(
        read(&dir.0.join("sb.log")),
        format!(
            "{0} stdout P abcd\n{0} stdout P efgh\n{0} stdout F ij\n\
             {1} stdout P xyz\n{2} stdout F !\n{3} stderr P err\n",
            ts(0),
            ts(2),
            ts(3),
            ts(4)
        )
    );
    // A line of exactly the maximum length is one full record.
    let dir = TempDir::new("exact");
    let mut logger = Logger::new(&config(&dir, DEFAULT_MAX_BYTES, 4));
    logger.input(STDOUT, b"abcd\n", at(0, 0));
    assert_eq!(
        read(&dir.0.join("sb.log")),
        format!("{} stdout F abcd\n", ts(0))
    );
}

#[test]
fn the_cap_holds_and_the_newest_output_is_kept() {
    let dir = TempDir::new("rotate");
    let cap = 16 * 1024;
    let mut logger = Logger::new(&config(&dir, cap, 256));
    let path = dir.0.join("sb.log");
    let rotated = dir.0.join("sb.log.1");
    for i in 0..5000 {
        logger.input(
            STDOUT,
            format!("line {i:05} {}\n", "x".repeat(i % 300)).as_bytes(),
            at(i as u64, 0),
        );
        let current = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let older = fs::metadata(&rotated).map(|m| m.len()).unwrap_or(0);
        assert!(current <= cap / 2, "{current} > half the cap");
        assert!(current + older <= cap);
    }
    let text = read(&rotated) + &read(&path);
    assert!(
        text.ends_with(&format!("F line 04999 {}\n", "x".repeat(4999 % 300))),
        "newest line kept"
    );
    assert!(text.contains("line 04999 "));
    assert!(!text.contains("line 00000 "), "oldest output dropped");
    // Every kept record is whole, and they are in order.
    let numbers: Vec<u32> = text
        .lines()
        .filter(|l| !l.contains(" P "))
        .filter_map(|l| l.split(' ').nth(4).and_then(|n| n.parse().ok()))
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] + 1 == w[1] || w[1] == w[0]),
        "{numbers:?}"
    );
    assert!(
        fs::metadata(&rotated).unwrap().len() > cap / 4,
        "the older half is not wasted"
    );
}

#[test]
fn a_failing_write_drops_and_counts_then_says_so() {
    let dir = TempDir::new("drop");
    let path = dir.0.join("sb.log");
    let mut logger = Logger::new(&config(&dir, DEFAULT_MAX_BYTES, DEFAULT_MAX_LINE));
    logger.input(STDOUT, b"before\n", at(0, 0));
    // A descriptor that refuses writes stands in for a full disk.
    logger.file.file = Some(File::open(&path).unwrap());
    logger.input(STDOUT, b"lost one\n", at(1, 0));
    logger.input(STDERR, b"lost two\n", at(1, 0));
    let lost = 2 * "1970-01-01T00:00:01.000000000Z stdout F lost one\n".len() as u64;
    assert_eq!(logger.file.dropped_total, lost);
    logger.file.file = Some(OpenOptions::new().append(true).open(&path).unwrap());
    logger.input(STDOUT, b"after\n", at(2, 0));
    let text = read(&path);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].ends_with("stdout F before"));
    assert!(lines[1].contains(&format!(
        "stderr F fsb-logger: {lost} bytes of output were dropped"
    )));
    assert!(lines[2].ends_with("stdout F after"));
    assert_eq!(logger.file.dropped_total, lost);
}

#[test]
fn an_unwritable_directory_still_lets_output_drain() {
    let dir = TempDir::new("nodir");
    // A file where the directory should be: every open fails.
    fs::write(dir.0.join("blocker"), b"").unwrap();
    let c = Config {
        path: dir.0.join("blocker").join("sb.log"),
        max_bytes: 65536,
        max_line: 1024,
    };
    let mut logger = Logger::new(&c);
    logger.input(STDOUT, b"nowhere\n", at(0, 0));
    assert!(logger.file.dropped_total > 0);
}
