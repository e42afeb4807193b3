//! The revision of what a pod runs: a short, stable hash of its definition.

use serde::Serialize;

/// FNV-1a over `definition`'s JSON, as 10 characters of the alphabet Kubernetes uses for
/// pod-template hashes (no vowels, no look-alikes). A Release hashes its pod template; an
/// InferenceSet hashes everything that defines a replica.
pub fn revision_hash<T: Serialize + ?Sized>(definition: &T) -> String {
    let bytes = serde_json::to_vec(definition).unwrap_or_default();
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..10)
        .map(|_| {
            let c = ALPHABET[(h % ALPHABET.len() as u64) as usize] as char;
            h /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_short_and_sensitive() {
        let a = revision_hash(&serde_json::json!({"image": "a"}));
        assert_eq!(a, revision_hash(&serde_json::json!({"image": "a"})));
        assert_ne!(a, revision_hash(&serde_json::json!({"image": "b"})));
        assert_eq!(a.len(), 10);
        assert!(
            a.bytes()
                .all(|c| b"bcdfghjklmnpqrstvwxz2456789".contains(&c))
        );
    }
}
