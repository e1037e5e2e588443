//! init gives the caller's memory back: before the sandbox is set up, and once the job runs.
//!
//! A sandbox's init is a forked copy of its caller (the daemon), and stays for as long as its
//! job runs. Every page of the caller's memory it still maps is shared copy-on-write: each page
//! the caller writes meanwhile is copied, and each copy interrupts the other CPUs to flush their
//! TLB — most of a busy daemon's kernel time per job (docs/benchmarks.md). So init unmaps its
//! anonymous memory twice: first thing after the fork ([`release_early`]), all of it but the
//! mappings that hold its `Prepared`'s buffers (named by `Prepared::each_buffer`: a few pages,
//! usually all in the forking thread's malloc arena, which stays whole) and its stack; once
//! the job has exec'd ([`release`]), those too, as it then needs only its stack, its code and
//! a few descriptors. A held start's intermediate
//! (also a fork of the caller) does the first before it forks init.
//!
//! Allocation-free (init may not allocate): `/proc/self/maps` is read through a stack buffer
//! and the regions kept in a fixed array. What is kept: every mapping of a file, the named
//! ones (`[stack]`, `[vdso]`…) but `[heap]`, the anonymous mapping right after a file's (a
//! binary's `.bss`), and those holding init's stack and its thread's control block (errno and
//! the stack protector's canary live there; the main thread's may be anywhere).

use std::os::fd::RawFd;

/// At most this many pages of the caller's heap are named in a [`Keep`]; a Prepared whose
/// buffers lie on more pages is not released early (its memory stays shared until the job runs).
pub(crate) const KEEP_MAX: usize = 256;

/// The pages holding a `Prepared`'s heap buffers, sorted: what init must keep mapped until
/// its job runs. Inline (no heap buffer of its own): it lives where the Prepared lives.
pub(crate) struct Keep {
    pages: [usize; KEEP_MAX],
    len: usize,
    /// Every buffer is named (false: too many pages; nothing is released early).
    complete: bool,
}

impl Default for Keep {
    fn default() -> Self {
        Keep {
            pages: [0; KEEP_MAX],
            len: 0,
            complete: false,
        }
    }
}

impl Keep {
    /// The pages of `addresses` (any order, repeats allowed).
    pub(crate) fn of(mut addresses: Vec<usize>) -> Keep {
        let page = crate::sys::page_size();
        for a in &mut addresses {
            *a &= !(page - 1);
        }
        addresses.sort_unstable();
        addresses.dedup();
        let mut keep = Keep::default();
        if addresses.len() <= KEEP_MAX {
            keep.pages[..addresses.len()].copy_from_slice(&addresses);
            keep.len = addresses.len();
            keep.complete = true;
        }
        keep
    }

    /// The pages, sorted; `None` when some buffer is not named.
    pub(crate) fn pages(&self) -> Option<&[usize]> {
        self.complete.then(|| &self.pages[..self.len])
    }
}

/// At most this many regions are unmapped (the rest stay shared, as before).
const MAX_REGIONS: usize = 1024;

/// One line of `/proc/<pid>/maps`, as far as [`release`] needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Line {
    pub start: usize,
    pub end: usize,
    /// Readable or writable (not a reserve with no access).
    pub accessible: bool,
    /// Backed by a file (a non-zero inode).
    pub file: bool,
    /// A name in brackets (`[stack]`, `[vdso]`, `[vvar]`…) but `[heap]`, which is dropped like
    /// any anonymous mapping.
    pub special: bool,
}

/// Parse one line (without its newline); `None` for what is not a maps line.
pub(crate) fn parse(line: &[u8]) -> Option<Line> {
    let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty()).fuse();
    let range = fields.next()?;
    let perms = fields.next()?;
    let _offset = fields.next()?;
    let _dev = fields.next()?;
    let inode = fields.next()?;
    let name = fields.next().unwrap_or_default();
    let dash = range.iter().position(|&b| b == b'-')?;
    let start = hex(&range[..dash])?;
    let end = hex(&range[dash + 1..])?;
    if end <= start || perms.len() < 4 {
        return None;
    }
    Some(Line {
        start,
        end,
        accessible: perms[0] == b'r' || perms[1] == b'w',
        file: inode.iter().any(|&b| b != b'0'),
        special: name.first() == Some(&b'[') && name != b"[heap]",
    })
}

fn hex(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    digits.iter().try_fold(0usize, |n, &d| {
        let v = (d as char).to_digit(16)?;
        Some((n << 4) | v as usize)
    })
}

/// Whether init may unmap `line` (after `prev`, the line before it); `keep`: addresses whose
/// mappings stay (its stack, its thread's control block, what it still reads), sorted.
pub(crate) fn droppable(line: &Line, prev: Option<&Line>, keep: &[usize]) -> bool {
    let first = keep.partition_point(|&a| a < line.start);
    if !line.accessible
        || line.file
        || line.special
        || keep.get(first).is_some_and(|&a| a < line.end)
    {
        return false;
    }
    // A binary's `.bss` continues its file-backed data mapping (without brk randomisation,
    // `[heap]` may begin right there, merged with it: kept then, shared as before).
    !prev.is_some_and(|p| p.file && p.end == line.start)
}

/// The regions of the maps text read from `fd` that init may unmap (see [`droppable`]): how
/// many were stored in `out`.
pub(crate) fn scan(fd: RawFd, keep: &[usize], out: &mut [(usize, usize)]) -> usize {
    let mut buf = [0u8; 4096];
    let (mut have, mut found) = (0usize, 0usize);
    let mut prev: Option<Line> = None;
    // A line longer than the buffer (a long path) is skipped whole: a file's, so kept.
    let mut skipping = false;
    loop {
        let got = match crate::sys::read_some(fd, &mut buf[have..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        have += got;
        let mut used = 0;
        while let Some(nl) = buf[used..have].iter().position(|&b| b == b'\n') {
            let line = &buf[used..used + nl];
            used += nl + 1;
            if std::mem::take(&mut skipping) {
                prev = None;
                continue;
            }
            let Some(parsed) = parse(line) else {
                prev = None;
                continue;
            };
            if droppable(&parsed, prev.as_ref(), keep) && found < out.len() {
                out[found] = (parsed.start, parsed.end);
                found += 1;
            }
            prev = Some(parsed);
        }
        buf.copy_within(used..have, 0);
        have -= used;
        if have == buf.len() {
            // No newline in a full buffer.
            have = 0;
            skipping = true;
        }
    }
    found
}

/// Unmap what [`scan`] finds in `/proc/self/maps` (open at `maps`), keeping the stack that
/// holds `sp` and this thread's control block. Nothing of what was unmapped may be touched
/// afterwards: the caller copies what it needs onto its stack first. Failures leave the memory
/// shared, as before.
pub(crate) fn release(maps: RawFd, sp: usize) {
    let mut keep = [sp, crate::sys::thread_pointer()];
    keep.sort_unstable();
    unmap_found(maps, &keep);
}

fn unmap_found(maps: RawFd, keep: &[usize]) {
    let mut regions = [(0usize, 0usize); MAX_REGIONS];
    let n = scan(maps, keep, &mut regions);
    for &(start, end) in &regions[..n] {
        crate::sys::unmap(start, end - start);
    }
}

/// Before a sandbox is set up: unmap the caller's memory but the pages of `prepared` (what
/// the set-up and the job's start read), the addresses of `more`, the stack holding `sp` and
/// this thread's control block. The caller's writes while the sandbox is set up then copy only
/// pages of those few regions. Whether it was done (not when `prepared` is incomplete, or
/// `/proc/self/maps` cannot be read: the memory then stays shared until the job runs).
pub(crate) fn release_early(prepared: &Keep, more: &[usize], sp: usize) -> bool {
    let Some(pages) = prepared.pages() else {
        return false;
    };
    let mut keep = [0usize; KEEP_MAX + 8];
    let fixed = [sp, crate::sys::thread_pointer()];
    let n = pages.len() + fixed.len() + more.len();
    if n > keep.len() {
        return false;
    }
    keep[..pages.len()].copy_from_slice(pages);
    keep[pages.len()..pages.len() + 2].copy_from_slice(&fixed);
    keep[pages.len() + 2..n].copy_from_slice(more);
    let keep = &mut keep[..n];
    keep.sort_unstable();
    let Ok(maps) = crate::sys::open_read(c"/proc/self/maps") else {
        return false;
    };
    unmap_found(maps, keep);
    // SAFETY: the descriptor was opened just above and is not used after this.
    unsafe { crate::sys::close(maps) };
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0b00000 r--p 00000000 08:01 1234 /usr/bin/mistryd
55d0c0b00000-55d0c0f00000 r-xp 00100000 08:01 1234 /usr/bin/mistryd
55d0c0f00000-55d0c0f40000 rw-p 00500000 08:01 1234 /usr/bin/mistryd
55d0c0f40000-55d0c0f48000 rw-p 00000000 00:00 0 
55d0c2000000-55d0c2400000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000800000 rw-p 00000000 00:00 0 
7f0000800000-7f0004000000 ---p 00000000 00:00 0 
7f0008000000-7f0008001000 ---p 00000000 00:00 0 
7f0008001000-7f0008201000 rw-p 00000000 00:00 0 
7f0009000000-7f0009001000 ---p 00000000 00:00 0 
7f0009001000-7f0009201000 rw-p 00000000 00:00 0 
7f000a000000-7f000a028000 r--p 00000000 08:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
7f000a200000-7f000a204000 rw-p 00200000 08:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
7f000a204000-7f000a211000 rw-p 00000000 00:00 0 
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
7ffd00100000-7ffd00104000 r--p 00000000 00:00 0                          [vvar]
7ffd00104000-7ffd00106000 r-xp 00000000 00:00 0                          [vdso]
";

    fn scan_text(text: &str, sp: usize) -> Vec<(usize, usize)> {
        let (r, w) = crate::sys::pipe().unwrap();
        crate::sys::write_all(w, text.as_bytes()).unwrap();
        // SAFETY: the write end is ours; closing it lets the scan see the end.
        unsafe { crate::sys::close(w) };
        let mut out = [(0, 0); 16];
        let n = scan(r, &[sp, 0x7f000a20a000], &mut out);
        // SAFETY: the read end is ours.
        unsafe { crate::sys::close(r) };
        out[..n].to_vec()
    }

    #[test]
    fn the_heap_arenas_and_other_stacks_go_the_files_bss_and_own_stack_stay() {
        // init's stack pointer in the second thread stack (7f0009001000-7f0009201000); its
        // thread control block in libc's .bss (kept anyway: after libc's data).
        let sp = 0x7f0009100000;
        assert_eq!(
            scan_text(MAPS, sp),
            vec![
                (0x55d0c2000000, 0x55d0c2400000), // [heap]
                (0x7f0000000000, 0x7f0000800000), // an arena's used part
                (0x7f0008001000, 0x7f0008201000), // another thread's stack
            ]
        );
    }

    #[test]
    fn lines_are_parsed_or_refused() {
        let l = parse(b"7f0000000000-7f0000800000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(
            (l.start, l.end, l.accessible, l.file),
            (0x7f0000000000, 0x7f0000800000, true, false)
        );
        assert!(parse(b"").is_none());
        assert!(parse(b"garbage").is_none());
        assert!(parse(b"2000-1000 rw-p 0 00:00 0").is_none());
        assert!(parse(b"zz-1000 rw-p 0 00:00 0").is_none());
        let h = parse(b"1000-2000 rw-p 00000000 00:00 0   [heap]").unwrap();
        assert!(!h.special && !h.file);
        assert!(
            parse(b"1000-2000 rw-p 00000000 00:00 0   [stack]")
                .unwrap()
                .special
        );
    }

    #[test]
    fn a_line_longer_than_the_buffer_is_skipped_and_the_next_one_read() {
        let long = format!(
            "1000-2000 rw-p 00000000 08:01 7 /{}\n3000-4000 rw-p 00000000 00:00 0 \n",
            "x".repeat(5000)
        );
        assert_eq!(scan_text(&long, 0), vec![(0x3000, 0x4000)]);
    }

    #[test]
    fn a_heap_right_after_a_binarys_data_stays() {
        let data = parse(b"1000-2000 rw-p 00001000 08:01 7 /bin/x").unwrap();
        let heap = parse(b"2000-9000 rw-p 00000000 00:00 0   [heap]").unwrap();
        assert!(!droppable(&heap, Some(&data), &[]));
        assert!(droppable(&heap, None, &[]));
    }

    #[test]
    fn the_mapping_of_the_thread_control_block_stays() {
        // The main thread's control block in an anonymous mapping of its own.
        let l = parse(b"7f0000000000-7f0000800000 rw-p 00000000 00:00 0 ").unwrap();
        assert!(droppable(&l, None, &[0x1000]));
        assert!(!droppable(&l, None, &[0x1000, 0x7f0000000740]));
    }

    #[test]
    fn a_prepared_start_on_too_many_pages_is_not_released_early() {
        let keep = Keep::of((0..=KEEP_MAX).map(|i| i * 4096 * 2).collect());
        assert!(keep.pages().is_none());
        let keep = Keep::of(vec![0x5008, 0x5010, 0x3000, 0x5ff0]);
        assert_eq!(keep.pages(), Some(&[0x3000, 0x5000][..]));
    }
}
