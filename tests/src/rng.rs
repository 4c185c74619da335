//! A small seeded pseudo-random generator (xoshiro256**, seeded through
//! SplitMix64). Test inputs must be reproducible, and the quality needed
//! here is "incompressible and unpatterned", not cryptographic.

pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `0..n` (n > 0); the bias of a modulo is negligible for
    /// the ranges used here.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

/// `len` bytes that compress well but not to nothing: lines of words with
/// a counter, like a log or a text dump.
pub fn text_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "select",
        "insert",
        "update",
        "customer",
        "order",
        "invoice",
        "amount",
        "status",
        "shipped",
        "pending",
        "warehouse",
        "données",
    ];
    let mut out = Vec::with_capacity(len + 128);
    let mut line = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("{line:08} ").as_bytes());
        for _ in 0..8 {
            out.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
            out.push(b' ');
        }
        out.push(b'\n');
        line += 1;
    }
    out.truncate(len);
    out
}

/// `len` bytes alternating incompressible and text blocks of 64 KiB.
pub fn mixed_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    const BLOCK: usize = 64 << 10;
    let mut out = Vec::with_capacity(len);
    let mut random = true;
    while out.len() < len {
        let n = BLOCK.min(len - out.len());
        if random {
            out.extend_from_slice(&rng.bytes(n));
        } else {
            out.extend_from_slice(&text_bytes(rng, n));
        }
        random = !random;
    }
    out
}
