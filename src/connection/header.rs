//! Where a request header ends, and whether it stayed within its size: a
//! pure byte scanner fed each read while a header is being received.
//!
//! It does not parse the header (Pingora does, once it is complete); it only
//! finds its end, an empty line (`\r\n\r\n`, or `\n\n`, which Pingora's parser
//! also accepts), so that floodwall can bound the bytes and the time a client
//! may spend sending one, before Pingora buffers up to its own 1 MiB.

/// What a scan of newly read bytes found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// The header is not complete yet; `seen` bytes of it so far.
    More,
    /// The header ended after `used` bytes of this read (the rest, if any,
    /// is body or the next pipelined request).
    Complete { used: usize },
    /// The header grew past the limit before it ended.
    TooLarge,
}

/// The state of one request header being received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeaderScan {
    /// Header bytes received so far.
    pub seen: usize,
    /// Line-ending state: 0 inside a line, 1 just after `\n`, 2 after `\n\r`.
    eol: u8,
}

impl HeaderScan {
    /// Feed the bytes of one read. `max` is the largest header allowed, in
    /// bytes, counting the final empty line.
    pub fn feed(&mut self, bytes: &[u8], max: usize) -> Scan {
        for (i, &b) in bytes.iter().enumerate() {
            self.eol = match (b, self.eol) {
                (b'\n', 1 | 2) => {
                    self.seen += i + 1;
                    return if self.seen > max {
                        Scan::TooLarge
                    } else {
                        Scan::Complete { used: i + 1 }
                    };
                }
                (b'\n', _) => 1,
                (b'\r', 1) => 2,
                _ => 0,
            };
        }
        self.seen += bytes.len();
        if self.seen > max {
            Scan::TooLarge
        } else {
            Scan::More
        }
    }
}

/// Where the header ends within `read`, given the last bytes read before
/// it (`tail`, at most 3: enough to finish an empty line split across
/// reads): the number of bytes of `read` up to and including the end.
pub fn end_in(tail: &[u8], read: &[u8]) -> Option<usize> {
    let mut s = HeaderScan::default();
    let tail = &tail[tail.len().saturating_sub(3)..];
    if let Scan::Complete { .. } = s.feed(tail, usize::MAX) {
        // The tail alone ended it: nothing of `read` is header.
        return Some(0);
    }
    match s.feed(read, usize::MAX) {
        Scan::Complete { used } => Some(used),
        _ => None,
    }
}

/// Keep the last bytes of what was read (for [`end_in`]).
pub fn push_tail(tail: &mut [u8; 3], len: &mut u8, read: &[u8]) {
    let mut joined = [0u8; 6];
    let old = &tail[..usize::from(*len)];
    let take = read.len().min(3);
    joined[..old.len()].copy_from_slice(old);
    joined[old.len()..old.len() + take].copy_from_slice(&read[read.len() - take..]);
    let all = &joined[..old.len() + take];
    let keep = &all[all.len().saturating_sub(3)..];
    tail[..keep.len()].copy_from_slice(keep);
    *len = keep.len() as u8;
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 64 * 1024;

    fn scan_all(chunks: &[&[u8]], max: usize) -> Vec<Scan> {
        let mut s = HeaderScan::default();
        chunks.iter().map(|c| s.feed(c, max)).collect()
    }

    #[test]
    fn a_header_in_one_read_ends_at_its_empty_line() {
        let req = b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
        let mut s = HeaderScan::default();
        let used = req.len() - 2;
        assert_eq!(s.feed(req, MAX), Scan::Complete { used });
        assert_eq!(s.seen, used);
    }

    #[test]
    fn the_end_is_found_across_reads_split_anywhere() {
        let req = b"GET / HTTP/1.1\r\nHost: x\r\nA: b\r\n\r\n";
        for split in 1..req.len() {
            let (a, b) = req.split_at(split);
            let got = scan_all(&[a, b], MAX);
            assert_eq!(
                got,
                vec![Scan::More, Scan::Complete { used: b.len() }],
                "split at {split}"
            );
        }
        // One byte at a time, as a slow client sends it.
        let bytes: Vec<&[u8]> = req.chunks(1).collect();
        let got = scan_all(&bytes, MAX);
        assert_eq!(got.last(), Some(&Scan::Complete { used: 1 }));
        assert!(got[..got.len() - 1].iter().all(|s| *s == Scan::More));
    }

    #[test]
    fn bare_newlines_end_a_header_too() {
        let mut s = HeaderScan::default();
        assert_eq!(
            s.feed(b"GET / HTTP/1.1\nHost: x\n\nrest", MAX),
            Scan::Complete { used: 24 }
        );
    }

    #[test]
    fn a_carriage_return_inside_a_line_does_not_end_it() {
        let mut s = HeaderScan::default();
        assert_eq!(s.feed(b"GET / HTTP/1.1\r\nA: b\rc\r\n", MAX), Scan::More);
        assert_eq!(s.feed(b"\r\n", MAX), Scan::Complete { used: 2 });
    }

    #[test]
    fn a_header_over_the_limit_is_refused_whether_or_not_it_ended() {
        // Ends within the read, but past the limit.
        let mut s = HeaderScan::default();
        assert_eq!(
            s.feed(b"GET / HTTP/1.1\r\nA: bbbbbbbb\r\n\r\n", 20),
            Scan::TooLarge
        );
        // Never ends: refused as soon as the bytes pass the limit.
        let mut s = HeaderScan::default();
        assert_eq!(s.feed(&[b'a'; 20], 20), Scan::More);
        assert_eq!(s.feed(b"a", 20), Scan::TooLarge);
        // Exactly at the limit is allowed.
        let req = b"GET / HTTP/1.1\r\n\r\n";
        let mut s = HeaderScan::default();
        assert_eq!(s.feed(req, req.len()), Scan::Complete { used: req.len() });
    }

    #[test]
    fn the_end_is_found_in_a_read_from_the_tail_of_the_previous_ones() {
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nBODY";
        // (A header complete before `split` is never read past: Pingora
        // stops reading once it parses one.)
        for split in 1..=req.len() - 4 {
            let (a, b) = req.split_at(split);
            let (mut tail, mut len) = ([0u8; 3], 0u8);
            // The earlier bytes arrive in pieces of 2.
            for piece in a.chunks(2) {
                push_tail(&mut tail, &mut len, piece);
            }
            let end = req.len() - 4; // before BODY
            let expected = if split == end {
                Some(0)
            } else {
                Some(end - split)
            };
            assert_eq!(
                end_in(&tail[..usize::from(len)], b),
                expected,
                "split at {split}"
            );
        }
        assert_eq!(end_in(b"", b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }

    #[test]
    fn bytes_after_the_end_are_not_counted() {
        let mut s = HeaderScan::default();
        let mut req = b"POST / HTTP/1.1\r\n\r\n".to_vec();
        req.extend_from_slice(&[b'x'; 1000]);
        assert_eq!(s.feed(&req, 100), Scan::Complete { used: 19 });
        assert_eq!(s.seen, 19);
    }
}
