//! `fuzz-seeds DIR`: writes every fuzz target's seeds to `DIR/<target>/seed-*` (the committed corpora
//! under `fuzz/corpus/` start from them).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    for t in ep_fuzzcases::TARGETS {
        let d = dir.join(t);
        std::fs::create_dir_all(&d)?;
        let seeds = ep_fuzzcases::seeds::of(t);
        for (name, bytes) in &seeds {
            std::fs::write(d.join(name), bytes)?;
        }
        eprintln!("{t}: {} seeds in {}", seeds.len(), d.display());
    }
    Ok(())
}
