//! Fuzzes the tolerant HPACK decoder: no panic, bounded memory, and the
//! tolerance promise itself. A decoder that attached late, and one that lost
//! blocks, must never name a field differently from one that saw everything.
//!
//! Input: one config byte, then header blocks separated by `SEP`.
#![no_main]

use libfuzzer_sys::fuzz_target;

// Built from the source file rather than through the agent crate, whose
// dependency tree (aya, reqwest, protobuf codegen) has nothing to do with this
// and would have to build under coverage instrumentation too.
#[allow(dead_code)]
#[path = "../../src/decode/hpack.rs"]
mod hpack;

use hpack::{HpackDecoder, MAX_STRING, TABLE_CAP};

const SEP: &[u8] = b"\xf0HPACK\xf0";
const SIZES: [u32; 8] = [0, 31, 64, 256, 4096, 65536, 1 << 20, u32::MAX];

type Fields = Vec<(Option<Vec<u8>>, Option<Vec<u8>>, bool)>;

fn run(d: &mut HpackDecoder, block: &[u8], scratch: &mut Vec<u8>, out: &mut Fields) -> bool {
    out.clear();
    let ok = d
        .decode(block, scratch, |f| {
            out.push((
                f.name.map(<[u8]>::to_vec),
                f.value.map(<[u8]>::to_vec),
                f.never_indexed,
            ))
        })
        .is_ok();
    assert!(d.known_size() <= TABLE_CAP);
    assert!(d.known_size() <= d.max_table_size() as usize);
    assert!(scratch.len() <= 2 * (MAX_STRING * 8 / 5 + 1));
    if !ok {
        assert_eq!(d.known_entries(), 0, "an error must lose the table");
    }
    ok
}

fn agree(full: &Fields, other: &Fields) {
    assert_eq!(full.len(), other.len());
    for (a, b) in full.iter().zip(other) {
        if let (Some(x), Some(y)) = (&a.0, &b.0) {
            assert_eq!(x, y, "names disagree");
        }
        if let (Some(x), Some(y)) = (&a.1, &b.1) {
            assert_eq!(x, y, "values disagree");
        }
        assert_eq!(a.2, b.2);
    }
}

fn split<'a>(mut data: &'a [u8], mut each: impl FnMut(&'a [u8])) {
    loop {
        match data.windows(SEP.len()).position(|w| w == SEP) {
            Some(at) => {
                each(&data[..at]);
                data = &data[at + SEP.len()..];
            }
            None => return each(data),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&cfg, rest)) = data.split_first() else {
        return;
    };
    let size = SIZES[usize::from(cfg & 7)];
    let mut full = HpackDecoder::new(size);
    let mut late = HpackDecoder::new_unknown(size);
    let mut holey = HpackDecoder::new(size);
    // Bits 3..7 say which blocks the holey decoder loses (cyclically).
    let holes = cfg >> 3;
    let (mut s1, mut s2, mut s3) = (Vec::new(), Vec::new(), Vec::new());
    let (mut f1, mut f2, mut f3) = (Vec::new(), Vec::new(), Vec::new());
    let mut i = 0u32;
    split(rest, |block| {
        let full_ok = run(&mut full, block, &mut s1, &mut f1);
        if run(&mut late, block, &mut s2, &mut f2) && full_ok {
            agree(&f1, &f2);
        }
        if holes & (1 << (i % 5)) != 0 {
            holey.lose();
        } else if run(&mut holey, block, &mut s3, &mut f3) && full_ok {
            agree(&f1, &f3);
        }
        i += 1;
    });
});
