//! Cached manifests in one append-only file, `<dir>/manifests.pack`.
//!
//! A manifest is a few KiB, and a file of its own costs an inode: on ext4 (without a
//! journal, as on this project's test machines, more so) creating one cost 180 µs to
//! 1.2 ms of CPU, two of them per manifest (content and `.meta`) tripled the cost of
//! a cold manifest GET. Here a manifest is one `pwrite` at the end of the pack.
//!
//! A record is `RGM1`, the header's length (u32, little endian), the body's length
//! (u64), the header (JSON: digest, media type) and the body. Opening reads the
//! headers; a record cut short (a crash during the write) or unreadable ends the
//! pack there and the rest is cut off. Bodies are checked against their digest each
//! time they are read. Forgotten records (evicted, corrupt) are garbage until the
//! pack is rewritten with the live ones only.

use std::fs::File;
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 4] = b"RGM1";
/// A record no longer wanted (evicted, replaced, corrupt): skipped at the next start.
const DEAD: &[u8; 4] = b"RGM0";
const FIXED: u64 = 4 + 4 + 8;
/// The longest header read back: a digest and a media type.
const MAX_HEADER: u32 = 4096;
/// Rewrite when this much is garbage and it is at least half the pack.
const COMPACT_AFTER: u64 = 8 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
}

/// A record found when the pack was opened.
pub struct Record {
    pub digest: String,
    pub media_type: Option<String>,
    /// Where the record starts, where its body does, and the body's length.
    pub start: u64,
    pub offset: u64,
    pub len: u64,
}

/// A record kept by a rewrite.
pub struct Live {
    pub digest: String,
    pub place: Place,
    /// The body's length.
    pub len: u64,
}

/// Where a manifest's bytes are: the pack file of the time (a rewrite makes a new
/// one; whoever holds the old one still reads the old bytes) and the offset.
#[derive(Debug, Clone)]
pub struct Place {
    pub file: Arc<File>,
    /// Where the record starts, and where its body does.
    pub start: u64,
    pub offset: u64,
}

struct State {
    file: Arc<File>,
    len: u64,
    garbage: u64,
}

pub struct Pack {
    path: PathBuf,
    state: Mutex<State>,
}

fn record_len(header_len: u64, body_len: u64) -> u64 {
    FIXED + header_len + body_len
}

fn encode(digest: &str, media_type: Option<&str>, body: &[u8]) -> io::Result<Vec<u8>> {
    let header = serde_json::to_vec(&Header {
        digest: digest.to_owned(),
        media_type: media_type.map(str::to_owned),
    })
    .map_err(io::Error::other)?;
    let mut out = Vec::with_capacity(FIXED as usize + header.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
    Ok(out)
}

impl Pack {
    /// Open (creating) the pack at `path` and list its records, oldest first.
    pub fn open(path: &Path) -> io::Result<(Pack, Vec<Record>)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let size = file.metadata()?.len();
        let mut records = Vec::new();
        let mut at = 0u64;
        let mut garbage = 0u64;
        while at < size {
            match read_header(&file, at, size) {
                Some((header, header_len, body_len, live)) => {
                    let len = record_len(header_len, body_len);
                    if live {
                        records.push(Record {
                            digest: header.digest,
                            media_type: header.media_type,
                            start: at,
                            offset: at + FIXED + header_len,
                            len: body_len,
                        });
                    } else {
                        garbage += len;
                    }
                    at += len;
                }
                None => {
                    tracing::warn!(
                        path = %path.display(),
                        "cache: the manifest pack is cut short or damaged at byte {at} of {size}; the rest is dropped"
                    );
                    file.set_len(at)?;
                    break;
                }
            }
        }
        let pack = Pack {
            path: path.to_owned(),
            state: Mutex::new(State {
                file: Arc::new(file),
                len: at,
                garbage,
            }),
        };
        Ok((pack, records))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hold the pack (no append or rewrite meanwhile) to mark records dead.
    pub fn hold(&self) -> Held<'_> {
        Held(self.lock())
    }

    /// Append a manifest; blocking. `then` runs with the pack still held (the caller
    /// indexes the record, so a rewrite cannot come between, and may kill the copy it
    /// replaces).
    pub fn append<T>(
        &self,
        digest: &str,
        media_type: Option<&str>,
        body: &[u8],
        then: impl FnOnce(Place, &mut Held<'_>) -> T,
    ) -> io::Result<T> {
        let record = encode(digest, media_type, body)?;
        let mut state = self.lock();
        let at = state.len;
        if let Err(e) = state.file.write_all_at(&record, at) {
            // Whatever part was written is cut off again: the pack stays whole.
            let _ = state.file.set_len(at);
            return Err(e);
        }
        state.len += record.len() as u64;
        let offset = at + (record.len() - body.len()) as u64;
        let place = Place {
            file: state.file.clone(),
            start: at,
            offset,
        };
        Ok(then(place, &mut Held(state)))
    }

    /// Whether enough is garbage to rewrite the pack.
    pub fn wants_rewrite(&self) -> bool {
        let state = self.lock();
        state.garbage >= COMPACT_AFTER && state.garbage * 2 >= state.len
    }

    /// Rewrite the pack with the live records only, copied as they are; blocking.
    /// `gather` lists them and `then` gets each one's new place, in the same order,
    /// both with the pack locked: no append comes between.
    pub fn rewrite(
        &self,
        gather: impl FnOnce() -> Vec<Live>,
        then: impl FnOnce(&[Live], Vec<Place>),
    ) -> io::Result<()> {
        let mut state = self.lock();
        let live = gather();
        let temp = self.path.with_extension("pack.tmp");
        let created = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)?;
        let mut out = io::BufWriter::new(created);
        let mut offsets = Vec::with_capacity(live.len());
        let mut at = 0u64;
        for l in &live {
            let head = l.place.offset - l.place.start;
            let mut record = vec![0u8; (head + l.len) as usize];
            l.place.file.read_exact_at(&mut record, l.place.start)?;
            out.write_all(&record)?;
            offsets.push((at, at + head));
            at += record.len() as u64;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        std::fs::rename(&temp, &self.path)?;
        let file = Arc::new(file);
        let places = offsets
            .into_iter()
            .map(|(start, offset)| Place {
                file: file.clone(),
                start,
                offset,
            })
            .collect();
        then(&live, places);
        *state = State {
            file,
            len: at,
            garbage: 0,
        };
        Ok(())
    }

    /// Drop every record.
    pub fn clear(&self) -> io::Result<()> {
        let mut state = self.lock();
        state.file.set_len(0)?;
        state.len = 0;
        state.garbage = 0;
        Ok(())
    }
}

/// A record's header at `at`, if it is whole within `size`, and whether it is live.
fn read_header(file: &File, at: u64, size: u64) -> Option<(Header, u64, u64, bool)> {
    let mut fixed = [0u8; FIXED as usize];
    file.read_exact_at(&mut fixed, at).ok()?;
    let live = &fixed[..4] == MAGIC;
    if !live && &fixed[..4] != DEAD {
        return None;
    }
    let header_len = u32::from_le_bytes(fixed[4..8].try_into().ok()?);
    let body_len = u64::from_le_bytes(fixed[8..16].try_into().ok()?);
    if header_len > MAX_HEADER {
        return None;
    }
    let end = at
        .checked_add(FIXED)?
        .checked_add(u64::from(header_len))?
        .checked_add(body_len)?;
    if end > size {
        return None;
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, at + FIXED).ok()?;
    let header: Header = serde_json::from_slice(&header).ok()?;
    Some((header, u64::from(header_len), body_len, live))
}

/// The pack, held: records may be marked dead.
pub struct Held<'a>(MutexGuard<'a, State>);

impl Held<'_> {
    /// The place of a record listed by [`Pack::open`].
    pub fn place(&self, r: &Record) -> Place {
        Place {
            file: self.0.file.clone(),
            start: r.start,
            offset: r.offset,
        }
    }

    /// Mark the record at `place` dead (if it is in the current file: an older one is
    /// gone already), so that a restart skips it; blocking.
    pub fn kill(&mut self, place: &Place, body_len: u64) {
        let state = &mut *self.0;
        if !Arc::ptr_eq(&place.file, &state.file) {
            return;
        }
        if let Err(e) = state.file.write_all_at(DEAD, place.start) {
            tracing::warn!("cache: cannot mark a manifest gone in the pack: {e}");
        }
        state.garbage += place.offset - place.start + body_len;
    }
}

/// A body's bytes; blocking.
pub fn read(place: &Place, len: u64) -> io::Result<Vec<u8>> {
    let mut body = vec![0u8; len as usize];
    place.file.read_exact_at(&mut body, place.offset)?;
    Ok(body)
}
