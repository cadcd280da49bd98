//! Bounded input: the depth and size limits every stanza meets before the engine builds a tree.
//!
//! Parsing, cloning, serializing and dropping a `minidom` tree all recurse once per level of
//! nesting. A host thread's stack (an Erlang NIF runs on a scheduler thread with a small one)
//! overflows long before a hostile stanza runs out of levels: 2,500 levels killed the BEAM,
//! 17,000 a Prosody. A stack overflow is no panic: nothing catches it, the server dies. So the
//! text is scanned first, without recursion and in one pass, and refused with a typed error if it
//! nests deeper or runs longer than the limits. Every tree the engine holds is therefore at most
//! `max_depth` levels deep, and every recursion over it (drop included) is bounded.

use crate::error::Error;

/// Default nesting depth accepted, the stanza's own element counting as level 1. Real stanzas
/// nest fewer than 20 levels (a MUC history message inside a forward inside an IQ is 6); the
/// protocol's own wrappers add at most 3 levels around a user's stanza.
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// Default size accepted, in bytes of XML text: Prosody's own s2s stream limit (512 KiB), so
/// nothing Prosody delivers over s2s by default is refused for size alone.
pub const DEFAULT_MAX_SIZE: usize = 512 * 1024;

/// The deepest limit a host may configure. Trees this deep are still far from what overflows a
/// NIF thread's stack (2,500 levels); every parse inside the engine enforces at least this.
pub const MAX_DEPTH_CEILING: usize = 256;

/// The largest size limit a host may configure (16 MiB).
pub const MAX_SIZE_CEILING: usize = 16 * 1024 * 1024;

/// The depth and size a stanza may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Levels of nesting, the top element being level 1.
    pub max_depth: usize,
    /// Bytes of XML text.
    pub max_size: usize,
}

impl Default for Limits {
    /// [`DEFAULT_MAX_DEPTH`] and [`DEFAULT_MAX_SIZE`].
    fn default() -> Self {
        Limits {
            max_depth: DEFAULT_MAX_DEPTH,
            max_size: DEFAULT_MAX_SIZE,
        }
    }
}

impl Limits {
    /// The bound every parse inside the engine enforces, whatever the host configured.
    pub const CEILING: Limits = Limits {
        max_depth: MAX_DEPTH_CEILING,
        max_size: MAX_SIZE_CEILING,
    };

    /// Limits from a host's configuration: each at least 1 and at most its ceiling.
    pub fn new(max_depth: usize, max_size: usize) -> Result<Self, Error> {
        if max_depth == 0 || max_depth > MAX_DEPTH_CEILING {
            return Err(Error::Config(format!(
                "max stanza depth must be 1 to {MAX_DEPTH_CEILING}, not {max_depth}"
            )));
        }
        if max_size == 0 || max_size > MAX_SIZE_CEILING {
            return Err(Error::Config(format!(
                "max stanza size must be 1 to {MAX_SIZE_CEILING} bytes, not {max_size}"
            )));
        }
        Ok(Limits {
            max_depth,
            max_size,
        })
    }
}

/// Refuse `xml` if it is longer than `limits.max_size` bytes or nests deeper than
/// `limits.max_depth` elements. One pass over the bytes, no recursion, no allocation; it stops at
/// the first level past the limit, so a 100,000-level stanza costs what its first 65 levels do.
///
/// This is no XML parser: on well-formed XML it counts exactly the nesting the parser will build;
/// on malformed XML it may count wrong only after the point where the parser fails anyway (an
/// unmatched end tag, a `<` inside an attribute value), so it never lets a tree deeper than the
/// limit be built. Comments, CDATA sections, processing instructions and declarations are skipped;
/// quoted attribute values may hold `>` and `/`.
pub fn check(xml: &str, limits: &Limits) -> Result<(), Error> {
    let b = xml.as_bytes();
    if b.len() > limits.max_size {
        return Err(Error::TooLarge {
            size: b.len(),
            limit: limits.max_size,
        });
    }
    let mut depth = 0usize;
    let mut i = 0usize;
    while i < b.len() {
        if b[i] != b'<' {
            i += 1;
            continue;
        }
        let rest = &b[i..];
        if rest.starts_with(b"</") {
            depth = depth.saturating_sub(1);
            i = after(b, i + 2, b">");
        } else if rest.starts_with(b"<!--") {
            i = after(b, i + 4, b"-->");
        } else if rest.starts_with(b"<![CDATA[") {
            i = after(b, i + 9, b"]]>");
        } else if rest.starts_with(b"<?") {
            i = after(b, i + 2, b"?>");
        } else if rest.starts_with(b"<!") {
            i = after(b, i + 2, b">");
        } else {
            depth += 1;
            if depth > limits.max_depth {
                return Err(Error::TooDeep {
                    limit: limits.max_depth,
                });
            }
            // The start tag runs to the first `>` outside a quoted attribute value.
            let mut j = i + 1;
            let mut quote = None;
            while j < b.len() {
                let c = b[j];
                match quote {
                    Some(q) if c == q => quote = None,
                    Some(_) => {}
                    None if c == b'"' || c == b'\'' => quote = Some(c),
                    None if c == b'>' => break,
                    None => {}
                }
                j += 1;
            }
            if j < b.len() && b[j - 1] == b'/' {
                // `<x/>`: opened and closed at once.
                depth -= 1;
            }
            i = j + 1;
        }
    }
    Ok(())
}

/// The index just past the first `end` at or after `from` (the end of the text if none).
fn after(b: &[u8], from: usize, end: &[u8]) -> usize {
    if from >= b.len() {
        return b.len();
    }
    b[from..]
        .windows(end.len())
        .position(|w| w == end)
        .map_or(b.len(), |p| from + p + end.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> String {
        "<a>".repeat(levels) + &"</a>".repeat(levels)
    }

    #[test]
    fn counts_nesting_not_elements() {
        let l = Limits::new(3, 1000).unwrap();
        assert_eq!(check("<a><b/><b><c/></b><b/></a>", &l), Ok(()));
        assert_eq!(check(&nested(3), &l), Ok(()));
        assert_eq!(check(&nested(4), &l), Err(Error::TooDeep { limit: 3 }));
    }

    #[test]
    fn skips_markup_that_opens_nothing() {
        let l = Limits::new(2, 1000).unwrap();
        let xml =
            "<a x='&gt;/' y=\"a/>b\"><!-- <b><b><b> --><![CDATA[<b><b><b>]]><?pi <b>?><b/></a>";
        assert_eq!(check(xml, &l), Ok(()));
    }

    #[test]
    fn quoted_gt_does_not_end_the_tag_early() {
        // If `>` inside the value ended the tag, the `/` before the real `>` would be missed and
        // the count would drift; here it must not.
        let l = Limits::new(1, 1000).unwrap();
        assert_eq!(check("<a v='>'/><a v='>'/>", &l), Ok(()));
    }

    #[test]
    fn refuses_size_first() {
        let l = Limits::new(64, 10).unwrap();
        assert_eq!(
            check("<a>0123456789</a>", &l),
            Err(Error::TooLarge {
                size: 17,
                limit: 10
            })
        );
    }

    #[test]
    fn config_bounds() {
        assert!(Limits::new(0, 1).is_err());
        assert!(Limits::new(MAX_DEPTH_CEILING + 1, 1).is_err());
        assert!(Limits::new(1, MAX_SIZE_CEILING + 1).is_err());
        assert!(Limits::new(MAX_DEPTH_CEILING, MAX_SIZE_CEILING).is_ok());
    }
}
