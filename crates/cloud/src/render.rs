//! A cloud prompt's content as token ids: the one place content becomes tokens.

use ep_model::chat::{render_prompt, ChatMessage, ChatTemplate};
use ep_model::tokenizer::Tokenizer;
use ep_proto::PromptContent;

/// Why a cloud prompt cannot be rendered (a client error: HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("the model has no chat template: register the prompt as 'text'")]
    NoTemplate,
    #[error("the chat template: {0}")]
    Template(String),
    #[error("tokenizing: {0}")]
    Tokenize(String),
    #[error("the prompt renders to no tokens")]
    Empty,
}

/// The token ids of a cloud prompt: messages are rendered with the model's chat template without a
/// generation prompt (the prefix an edge conversation extends); text is tokenized as it is, with
/// special-token text parsed.
///
/// The one rendering step of the cloud (the role-injection-safe `ep_model::chat::render_prompt` goes
/// here when it lands).
pub fn render_cloud_prompt(
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    content: &PromptContent,
) -> Result<Vec<u32>, RenderError> {
    let tokens = match content {
        // Text is the operator's raw prefix: special-token text in it is parsed.
        PromptContent::Text(t) => tok
            .encode(t, true)
            .map_err(|e| RenderError::Tokenize(e.to_string()))?,
        // Messages go through the same render + tokenize as the edge and `generate` (content's
        // special-token text stays text), so an edge's conversation extends exactly these tokens.
        PromptContent::Messages(m) => {
            let t = template.ok_or(RenderError::NoTemplate)?;
            let msgs: Vec<ChatMessage> = m
                .iter()
                .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
                .collect();
            render_prompt(tok, t, &msgs, false)
                .map_err(|e| RenderError::Template(e.to_string()))?
                .tokens
        }
    };
    if tokens.is_empty() {
        return Err(RenderError::Empty);
    }
    Ok(tokens)
}

/// Hex BLAKE3 of a chat template's source (a manifest's `template_digest`).
pub fn template_digest(template: &ChatTemplate) -> [u8; 32] {
    template.source_digest()
}
