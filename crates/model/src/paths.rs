//! Where EdgePrompt keeps its files: the home directory and the default model in it.

use std::path::PathBuf;

/// File name of the default model (SmolLM2-135M-Instruct, Q4_1).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$EDGEPROMPT_HOME`, else `~/.cache/edgeprompt`.
pub fn edgeprompt_home() -> PathBuf {
    if let Some(h) = std::env::var_os("EDGEPROMPT_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("edgeprompt")
}

/// Where the fetch script (`scripts/fetch-model.sh`) puts the default model.
pub fn default_model_path() -> PathBuf {
    edgeprompt_home().join(DEFAULT_MODEL_FILE)
}
