//! Resumable log appends: where a piece of console output goes, as a pure function of what the
//! server already holds. The HTTP side is [`crate::types::LogOffsetResponse`].

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
}
