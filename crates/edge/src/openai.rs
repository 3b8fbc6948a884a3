//! The OpenAI-compatible request and response types (with the vLLM extras `top_k`, `min_p`,
//! `repetition_penalty`, `ignore_eos`, `cache_salt`, and EdgePrompt's `edge_prompt`), with their
//! OpenAPI schemas.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A message's content: a string, or a list of parts of which only `text` parts are supported.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ContentPart {
    /// Only `text` is supported.
    #[serde(rename = "type")]
    #[schema(value_type = TextPartType)]
    pub kind: String,
    #[serde(default)]
    #[schema(value_type = String, required = true)]
    pub text: Option<String>,
}

/// The one supported type of content part (schema only).
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum TextPartType {
    Text,
}

/// The role of a client's chat message (schema only).
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum ChatRole {
    System,
    Developer,
    User,
    Assistant,
}

/// The role of an edge prompt's message (schema only).
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum EdgeRole {
    System,
    User,
    Assistant,
}

/// `response_format`: only `{"type": "text"}` (schema only).
#[derive(ToSchema)]
pub struct ResponseFormat {
    #[schema(rename = "type")]
    pub kind: TextPartType,
}

/// A chat message as a client sends it.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct RequestMessage {
    /// `system`, `developer` (rendered as `system`), `user` or `assistant`.
    #[schema(value_type = ChatRole)]
    pub role: String,
    pub content: Content,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `stop`: one string or a list.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and `"usage": null` in the others).
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The sampling and limit fields both endpoints share.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct SamplingFields {
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// 0 to 2; 0 is greedy. Default 1.
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
    /// In (0, 1]. Default 1.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    /// Only 1 is supported.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub seed: Option<i64>,
    /// -2 to 2.
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f64>,
    /// -2 to 2.
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f64>,
    /// vLLM: keep the k most likely tokens (-1 or 0: off).
    #[serde(default)]
    #[schema(minimum = -1)]
    pub top_k: Option<i64>,
    /// vLLM: drop tokens below this fraction of the top probability, in [0, 1].
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub min_p: Option<f64>,
    /// vLLM: repetition penalty, in (0, 2]; 1 is off.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 2.0)]
    pub repetition_penalty: Option<f64>,
    /// vLLM: keep generating past end-of-generation tokens.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Refines the tenant's KV salt: requests with different `cache_salt` never share private KV.
    #[serde(default)]
    pub cache_salt: Option<String>,
    /// The name of one of this tenant's edge prompts, rendered as a system message after the cloud
    /// prompt.
    #[serde(default)]
    pub edge_prompt: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// Not supported (must be absent, null or empty).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub logit_bias: Option<serde_json::Value>,
}

impl SamplingFields {
    /// Whether the answer streams as SSE.
    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }
    /// Whether a streamed answer ends with a usage chunk (`stream_options.include_usage`).
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// The model id, or `"<model>:<cloud-prompt-name>"` to continue a cloud prompt.
    pub model: String,
    #[schema(min_items = 1)]
    pub messages: Vec<RequestMessage>,
    /// Preferred over `max_tokens` when both are given.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    /// Return log-probabilities of the generated tokens.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// 0 to 20 alternatives per token (more than 0 needs `logprobs`).
    #[serde(default)]
    #[schema(maximum = 20)]
    pub top_logprobs: Option<u64>,
    /// Not supported (must be absent, null or empty).
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>, max_items = 0)]
    pub tools: Option<serde_json::Value>,
    /// Only `{"type": "text"}` is supported.
    #[serde(default)]
    #[schema(value_type = Option<ResponseFormat>)]
    pub response_format: Option<serde_json::Value>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// A completions prompt: text, one-element list of text, or token ids.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct CompletionRequest {
    /// The model id, or `"<model>:<cloud-prompt-name>"` (a text cloud prompt the prompt continues).
    pub model: String,
    pub prompt: PromptInput,
    /// Log-probabilities of this many alternatives per token (0 to 20).
    #[serde(default)]
    #[schema(maximum = 20)]
    pub logprobs: Option<u64>,
    /// Only false is supported.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Only 1 is supported.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1)]
    pub best_of: Option<u64>,
    /// Not supported (must be absent, null or empty).
    #[serde(default)]
    #[schema(max_length = 0)]
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV this edge did not compute for this request (prefix cache or cloud).
    pub cached_tokens: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AssistantMessage {
    pub role: String,
    pub content: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// The answer of a non-streaming chat completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

/// One `data:` event of a streaming chat completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// With `stream_options.include_usage`: null in every chunk but the last (which has no choices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// Completions' legacy log-probability format.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<std::collections::BTreeMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length` (null in streamed chunks before the last).
    pub finish_reason: Option<String>,
}

/// The answer of a completion (also each streamed chunk).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Completion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

/// `GET /v1/models`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

/// A chat message of an edge prompt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EdgeMessage {
    #[schema(value_type = EdgeRole)]
    pub role: String,
    pub content: String,
}

/// `POST /v1/edge-prompts`: exactly one of `text` (rendered as one system message; in completions,
/// text after the cloud prompt) and `messages`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEdgePrompt {
    /// 1 to 128 characters (surrounding white space trimmed), without `/`, `:` or control
    /// characters.
    #[schema(
        pattern = r"^[^/:\x00-\x1f\x7f-\x9f]*[^/:\s\x00-\x1f\x7f-\x9f][^/:\x00-\x1f\x7f-\x9f]*$",
        max_length = 128
    )]
    pub name: String,
    #[serde(default)]
    #[schema(min_length = 1)]
    pub text: Option<String>,
    #[serde(default)]
    #[schema(min_items = 1)]
    pub messages: Option<Vec<EdgeMessage>>,
}

/// An edge prompt as listed (its size, never its content).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EdgePromptInfo {
    pub name: String,
    /// `text` or `messages`.
    pub kind: String,
    pub bytes: usize,
    pub created: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EdgePromptList {
    pub object: String,
    pub data: Vec<EdgePromptInfo>,
}

/// The answer of `DELETE /v1/edge-prompts/{name}` and `DELETE /v1/tenants/self/cache`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Purged {
    /// The deleted edge prompt's name, if one was deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<String>,
    /// Private KV blocks of this tenant dropped from memory.
    pub purged_blocks: usize,
}
