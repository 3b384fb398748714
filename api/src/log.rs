//! Resumable log appends: where a piece of console output goes, as a pure function of what the
//! server already holds. The HTTP side is [`crate::types::LogOffsetResponse`]. A job's console
//! cap keeps the head and a rolling tail ([`ConsoleCap`]).

/// What became of a piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendKind {
    /// It carried bytes past what had been received: they are taken (answered 202).
    Appended,
    /// Every byte of it had been received already: nothing is written (answered 200).
    AlreadyStored,
    /// It starts past what has been received: nothing is written; the runner resends from
    /// `next_offset` (answered 416).
    Gap,
}

impl AppendKind {
    pub fn http_status(self) -> u16 {
        match self {
            AppendKind::Appended => 202,
            AppendKind::AlreadyStored => 200,
            AppendKind::Gap => 416,
        }
    }
}

/// How to store a piece: write `piece[skip .. skip + keep]` at offset `write_at` of the stored
/// log, then answer `next_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendPlan {
    pub kind: AppendKind,
    pub write_at: u64,
    pub skip: u64,
    pub keep: u64,
    /// New bytes past the cap: counted as received, not kept.
    pub dropped: u64,
    /// What the server has received after this piece: the runner's next offset.
    pub next_offset: u64,
}

/// Plans a piece of `piece_len` bytes sent at `offset`, when `received` bytes have been received
/// before and at most `cap` are kept. The stored bytes always win over a resent piece (they are
/// never rewritten), so a piece sent twice, or two overlapping pieces, store each byte once.
/// `cap` keeps the head only; the server keeps head and tail by [`ConsoleCap::plan`], which
/// follows this rule for what is new.
pub fn plan_append(received: u64, offset: u64, piece_len: u64, cap: u64) -> AppendPlan {
    let nothing = |kind| AppendPlan {
        kind,
        write_at: received.min(cap),
        skip: 0,
        keep: 0,
        dropped: 0,
        next_offset: received,
    };
    if offset > received {
        return nothing(AppendKind::Gap);
    }
    let end = offset.saturating_add(piece_len);
    if end <= received {
        return nothing(AppendKind::AlreadyStored);
    }
    let new = end - received;
    let keep = end.min(cap).saturating_sub(received);
    AppendPlan {
        kind: AppendKind::Appended,
        write_at: received,
        skip: received - offset,
        keep,
        dropped: new - keep,
        next_offset: end,
    }
}

/// How a job's console cap splits what is kept: the first half of the cap from the start of the
/// console (the boot, the job's first words) and a rolling last part (where it failed). Bytes
/// between the two are counted as received and dropped; readers see a marker saying how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleCap {
    pub head: u64,
    pub tail: u64,
}

/// What is kept once `end` bytes have been received: `[0, head_end)` and `[tail_start, end)`.
/// `head_end == tail_start` when nothing was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub head_end: u64,
    pub tail_start: u64,
    pub end: u64,
}

/// One write of a console piece: `piece[skip .. skip + len]` stored at console offset `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PieceWrite {
    pub at: u64,
    pub skip: u64,
    pub len: u64,
}

/// How to store a piece under a head-and-tail cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsolePlan {
    pub kind: AppendKind,
    /// The part that lands in the head, then the part that lands in the tail (either may be
    /// empty; they are never adjacent, so two rows, not one).
    pub writes: [PieceWrite; 2],
    /// Stored tail bytes before this offset are no longer kept: the rolling tail moved on.
    pub forget_before: Option<u64>,
    /// What the server has received after this piece: the runner's next offset.
    pub next_offset: u64,
    /// The layout after this piece.
    pub layout: Layout,
}

/// One part of what a reader is sent from a console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadPart {
    /// Kept bytes `[from, to)` of the console (by the runner's offsets).
    Stored { from: u64, to: u64 },
    /// This many bytes were dropped here by the cap.
    Dropped(u64),
}

impl ConsoleCap {
    pub fn new(cap: u64) -> ConsoleCap {
        let head = cap / 2;
        ConsoleCap {
            head,
            tail: cap - head,
        }
    }

    pub fn cap(&self) -> u64 {
        self.head + self.tail
    }

    pub fn layout(&self, end: u64) -> Layout {
        let head_end = end.min(self.head);
        let tail_start = if end <= self.cap() {
            head_end
        } else {
            end - self.tail
        };
        Layout {
            head_end,
            tail_start,
            end,
        }
    }

    /// Plans a piece of `piece_len` bytes sent at `offset` when `received` bytes have come
    /// before. Resending and gaps follow [`plan_append`]'s rule (by the runner's offsets, which
    /// count every byte, kept or not), so the runner resumes the same way whatever is kept.
    pub fn plan(&self, received: u64, offset: u64, piece_len: u64) -> ConsolePlan {
        let p = plan_append(received, offset, piece_len, u64::MAX);
        let before = self.layout(received);
        let after = self.layout(p.next_offset);
        let mut writes = [PieceWrite::default(); 2];
        if p.kind == AppendKind::Appended {
            let end = p.next_offset;
            let write = |from: u64, to: u64| PieceWrite {
                at: from,
                skip: from - offset,
                len: to.saturating_sub(from),
            };
            if received < after.head_end {
                writes[0] = write(received, after.head_end);
            }
            let tail_from = received.max(after.tail_start).max(after.head_end);
            if tail_from < end {
                writes[1] = write(tail_from, end);
            }
        }
        let forget_before =
            (after.tail_start > before.tail_start.max(after.head_end)).then_some(after.tail_start);
        ConsolePlan {
            kind: p.kind,
            writes,
            forget_before,
            next_offset: p.next_offset,
            layout: after,
        }
    }
}

impl Layout {
    /// Bytes received and not kept.
    pub fn dropped(&self) -> u64 {
        self.tail_start - self.head_end
    }

    /// Bytes kept.
    pub fn kept(&self) -> u64 {
        self.head_end + (self.end - self.tail_start)
    }

    /// Where console offset `at` lies in the kept bytes laid end to end (how the compacted blob
    /// holds them); an offset in the dropped stretch maps to the tail's first byte.
    pub fn packed(&self, at: u64) -> u64 {
        if at <= self.head_end {
            at
        } else {
            self.head_end
                + at.saturating_sub(self.tail_start)
                    .min(self.end - self.tail_start)
        }
    }

    /// What a reader at offset `from` is sent, in order: kept bytes, a drop marker where the
    /// cap dropped some (also when the rolling tail moved past `from` since the reader's last
    /// look), then the rest; and the offset to ask for next.
    pub fn read_from(&self, from: u64) -> (Vec<ReadPart>, u64) {
        let mut parts = Vec::new();
        let mut at = from;
        if at < self.head_end {
            parts.push(ReadPart::Stored {
                from: at,
                to: self.head_end,
            });
            at = self.head_end;
        }
        if at < self.tail_start {
            parts.push(ReadPart::Dropped(self.tail_start - at));
            at = self.tail_start;
        }
        if at < self.end {
            parts.push(ReadPart::Stored {
                from: at,
                to: self.end,
            });
            at = self.end;
        }
        (parts, at.max(from))
    }
}

/// What a reader sees where the cap dropped `n` bytes. Never longer than `n`: a reader's offset
/// moves at least as far as the bytes it is given (clients check that), so a short drop gets a
/// shorter marker.
pub fn dropped_marker(n: u64) -> String {
    fit(
        n,
        &[
            format!("\n[construir: {n} bytes of console dropped here by the job's console cap]\n"),
            format!("\n[construir: {n} bytes dropped]\n"),
            format!("[{n} dropped]"),
        ],
    )
}

/// The first of `texts` at most `room` bytes long, else `room` dots.
pub fn fit(room: u64, texts: &[String]) -> String {
    texts
        .iter()
        .find(|t| t.len() as u64 <= room)
        .cloned()
        .unwrap_or_else(|| ".".repeat(room.min(64) as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: u64 = 100;

    #[test]
    fn an_adjacent_piece_is_appended() {
        let p = plan_append(10, 10, 5, CAP);
        assert_eq!(p.kind, AppendKind::Appended);
        assert_eq!(
            (p.write_at, p.skip, p.keep, p.dropped, p.next_offset),
            (10, 0, 5, 0, 15)
        );
        assert_eq!(p.kind.http_status(), 202);
    }

    #[test]
    fn a_resent_piece_is_stored_once() {
        let p = plan_append(15, 10, 5, CAP);
        assert_eq!(
            (p.kind, p.keep, p.next_offset),
            (AppendKind::AlreadyStored, 0, 15)
        );
        let overlapping = plan_append(15, 10, 10, CAP);
        assert_eq!(overlapping.kind, AppendKind::Appended);
        assert_eq!(
            (
                overlapping.write_at,
                overlapping.skip,
                overlapping.keep,
                overlapping.next_offset
            ),
            (15, 5, 5, 20)
        );
        assert_eq!(plan_append(15, 15, 0, CAP).kind, AppendKind::AlreadyStored);
    }

    #[test]
    fn a_gap_is_answered_with_where_to_resume() {
        let p = plan_append(15, 20, 5, CAP);
        assert_eq!((p.kind, p.keep, p.next_offset), (AppendKind::Gap, 0, 15));
        assert_eq!(p.kind.http_status(), 416);
    }

    #[test]
    fn bytes_past_the_cap_are_counted_not_kept() {
        let p = plan_append(95, 95, 10, CAP);
        assert_eq!((p.keep, p.dropped, p.next_offset), (5, 5, 105));
        let p = plan_append(105, 105, 10, CAP);
        assert_eq!(
            (p.kind, p.keep, p.dropped, p.next_offset),
            (AppendKind::Appended, 0, 10, 115)
        );
        let huge = plan_append(0, 0, u64::MAX, CAP);
        assert_eq!((huge.keep, huge.next_offset), (CAP, u64::MAX));
    }

    #[test]
    fn any_split_of_a_stream_stores_it_once() {
        // Pieces of a 50-byte stream, sent out of order and repeated, as a flaky link would.
        let sends = [
            (0, 10),
            (20, 10),
            (0, 10),
            (10, 15),
            (5, 30),
            (35, 15),
            (35, 15),
        ];
        let mut stored = Vec::new();
        let mut received = 0;
        for (offset, len) in sends {
            let piece: Vec<u8> = (offset..offset + len).map(|b| b as u8).collect();
            let p = plan_append(received, offset, len, CAP);
            assert_eq!(p.write_at, stored.len() as u64);
            stored.extend_from_slice(&piece[p.skip as usize..(p.skip + p.keep) as usize]);
            received = p.next_offset;
        }
        assert_eq!(stored, (0..50u64).map(|b| b as u8).collect::<Vec<_>>());
    }

    #[test]
    fn the_cap_keeps_the_head_and_a_rolling_tail() {
        let cap = ConsoleCap::new(10);
        assert_eq!((cap.head, cap.tail), (5, 5));
        // Under the cap everything is kept, in one stretch.
        let l = cap.layout(8);
        assert_eq!(
            (l.head_end, l.tail_start, l.dropped(), l.kept()),
            (5, 5, 0, 8)
        );
        // Past it: the first 5 and the last 5.
        let l = cap.layout(23);
        assert_eq!(
            (l.head_end, l.tail_start, l.dropped(), l.kept()),
            (5, 18, 13, 10)
        );
        assert_eq!(
            (l.packed(3), l.packed(5), l.packed(12), l.packed(20)),
            (3, 5, 5, 7)
        );
        let odd = ConsoleCap::new(7);
        assert_eq!((odd.head, odd.tail, odd.cap()), (3, 4, 7));
        let none = ConsoleCap::new(0).layout(9);
        assert_eq!((none.kept(), none.dropped()), (0, 9));
    }

    #[test]
    fn a_piece_is_split_between_head_and_tail_and_the_tail_rolls() {
        let cap = ConsoleCap::new(10);
        // One piece over the whole cap: its first 5 bytes and its last 5.
        let p = cap.plan(0, 0, 30);
        assert_eq!(p.kind, AppendKind::Appended);
        assert_eq!(
            p.writes[0],
            PieceWrite {
                at: 0,
                skip: 0,
                len: 5
            }
        );
        assert_eq!(
            p.writes[1],
            PieceWrite {
                at: 25,
                skip: 25,
                len: 5
            }
        );
        assert_eq!((p.forget_before, p.next_offset), (Some(25), 30));
        // The next piece rolls the tail: 3 new bytes, the 3 oldest tail bytes forgotten.
        let p = cap.plan(30, 30, 3);
        assert_eq!(p.writes[0].len, 0);
        assert_eq!(
            p.writes[1],
            PieceWrite {
                at: 30,
                skip: 0,
                len: 3
            }
        );
        assert_eq!(p.forget_before, Some(28));
        // A resent piece overlapping the received bytes: only its new part, at its offset.
        let p = cap.plan(33, 31, 4);
        assert_eq!(
            p.writes[1],
            PieceWrite {
                at: 33,
                skip: 2,
                len: 2
            }
        );
        assert_eq!(cap.plan(35, 31, 4).kind, AppendKind::AlreadyStored);
        let gap = cap.plan(35, 40, 4);
        assert_eq!(
            (gap.kind, gap.next_offset, gap.writes[1].len),
            (AppendKind::Gap, 35, 0)
        );
        assert_eq!(gap.forget_before, None, "a refused piece changes nothing");
        // Under the cap nothing is forgotten.
        assert_eq!(cap.plan(2, 2, 6).forget_before, None);
        assert_eq!(
            cap.plan(2, 2, 6).writes[1],
            PieceWrite {
                at: 5,
                skip: 3,
                len: 3
            }
        );
    }

    #[test]
    fn readers_see_head_marker_tail_and_resume_past_rolled_bytes() {
        let l = ConsoleCap::new(10).layout(23);
        let (parts, next) = l.read_from(0);
        assert_eq!(
            parts,
            vec![
                ReadPart::Stored { from: 0, to: 5 },
                ReadPart::Dropped(13),
                ReadPart::Stored { from: 18, to: 23 }
            ]
        );
        assert_eq!(next, 23);
        // A follower that had read up to 16 while the tail was there: the rest is gone.
        let (parts, next) = l.read_from(16);
        assert_eq!(
            parts,
            vec![ReadPart::Dropped(2), ReadPart::Stored { from: 18, to: 23 }]
        );
        assert_eq!(next, 23);
        assert_eq!(l.read_from(23), (vec![], 23));
        assert_eq!(l.read_from(40), (vec![], 40));
        assert!(dropped_marker(13).contains("13 dropped"));
        assert!(dropped_marker(500).contains("500 bytes of console dropped"));
        for n in 0..200 {
            assert!(dropped_marker(n).len() as u64 <= n, "{n}");
        }
        assert_eq!(dropped_marker(3), "...");
    }

    /// A simulated store under the head-and-tail rule: whatever the split and the repeats, it
    /// holds exactly the first half of the cap and the last bytes received.
    #[test]
    fn any_split_of_a_long_stream_keeps_its_head_and_tail() {
        let cap = ConsoleCap::new(40);
        let stream: Vec<u8> = (0..500u32).map(|b| (b % 251) as u8).collect();
        let mut stored: std::collections::BTreeMap<u64, u8> = Default::default();
        let mut received = 0u64;
        let mut offset = 0u64;
        let mut len = 1u64;
        while received < stream.len() as u64 {
            // Resend from a little behind now and then, and vary the piece sizes.
            let from = if len.is_multiple_of(3) {
                offset.saturating_sub(4)
            } else {
                offset
            };
            let to = (from + len).min(stream.len() as u64);
            let piece = &stream[from as usize..to as usize];
            let p = cap.plan(received, from, piece.len() as u64);
            if let Some(cut) = p.forget_before {
                stored.retain(|&k, _| k < cap.head || k >= cut);
            }
            for w in p.writes {
                for i in 0..w.len {
                    assert!(
                        stored
                            .insert(w.at + i, piece[(w.skip + i) as usize])
                            .is_none()
                    );
                }
            }
            received = p.next_offset;
            offset = received;
            len = len % 37 + 1;
        }
        let l = cap.layout(received);
        let want: Vec<(u64, u8)> = (0..l.head_end)
            .chain(l.tail_start..l.end)
            .map(|k| (k, stream[k as usize]))
            .collect();
        assert_eq!(stored.into_iter().collect::<Vec<_>>(), want);
        assert_eq!(l.kept(), 40);
    }
}
