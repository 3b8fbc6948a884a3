//! Chat templates: the model's own Jinja template (`tokenizer.chat_template`) rendered with minijinja,
//! configured like Hugging Face `transformers` renders it (`apply_chat_template`):
//!
//! * `trim_blocks` and `lstrip_blocks` on, `keep_trailing_newline` off, no auto-escaping;
//! * Python string / dict methods (`.strip()`, `.startswith()`, `.items()`, ...) via
//!   `minijinja-contrib`'s pycompat, `{% break %}` / `{% continue %}` (jinja2's loopcontrols);
//! * `raise_exception(msg)` fails the render with [`ChatError::Raised`] carrying `msg`;
//! * `strftime_now(fmt)` formats the current time (UTC);
//! * `tojson` behaves like transformers' (`json.dumps(x, ensure_ascii=False)`: `", "` / `": "`
//!   separators, optional `indent`, `sort_keys`, `ensure_ascii`, `separators` keyword arguments).
//!
//! The template sees `messages` (a list of `{role, content}` maps), `add_generation_prompt`,
//! `bos_token` and `eos_token`.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{context, AutoEscape, Environment, Error, ErrorKind, Value};

use crate::gguf::{Gguf, MetaValue};
use crate::tokenizer::Tokenizer;

const TEMPLATE_NAME: &str = "chat_template";

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Errors compiling or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template does not parse.
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// The template called `raise_exception(message)`.
    #[error("chat template raised an exception: {0}")]
    Raised(String),
    /// Any other failure while rendering.
    #[error("chat template rendering failed: {0}")]
    Render(String),
    /// `tokenizer.chat_template` is present but not a string.
    #[error("tokenizer.chat_template has type {0}, expected string")]
    NotAString(&'static str),
    /// The template's file in a model directory could not be read.
    #[error("{0}")]
    File(String),
}

/// Marks errors that come from the template's `raise_exception`.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a template. `bos_token` / `eos_token` are the texts the template sees under those names.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The template stored in a GGUF file (`tokenizer.chat_template`), with the tokenizer's BOS / EOS
    /// token texts; `None` when the file has no template.
    pub fn from_gguf(g: &Gguf, tok: &Tokenizer) -> Result<Option<Self>, ChatError> {
        let source = match g.get("tokenizer.chat_template") {
            None => return Ok(None),
            Some(MetaValue::String(s)) => s,
            Some(v) => return Err(ChatError::NotAString(v.type_name())),
        };
        let text = |id: Option<u32>| {
            id.map(|id| String::from_utf8_lossy(tok.token_bytes(id)).into_owned())
                .unwrap_or_default()
        };
        Self::new(source, &text(tok.bos_id()), &text(tok.eos_id())).map(Some)
    }

    /// The template of a Hugging Face model directory: `chat_template` in `tokenizer_config.json` (a
    /// string, or a list of named templates of which "default", else the first, is used), else the file
    /// `chat_template.jinja`; `None` when there is neither. The template sees the config's `bos_token` /
    /// `eos_token` texts (else the tokenizer's).
    pub fn from_hf_dir(dir: &std::path::Path, tok: &Tokenizer) -> Result<Option<Self>, ChatError> {
        let Some((source, bos, eos)) = crate::hf_tokenizer::chat_template_source(dir)
            .map_err(|e| ChatError::File(e.to_string()))?
        else {
            return Ok(None);
        };
        let text = |id: Option<u32>| {
            id.map(|id| String::from_utf8_lossy(tok.token_bytes(id)).into_owned())
                .unwrap_or_default()
        };
        let bos = bos.unwrap_or_else(|| text(tok.bos_id()));
        let eos = eos.unwrap_or_else(|| text(tok.eos_id()));
        Self::new(&source, &bos, &eos).map(Some)
    }

    /// Renders the conversation. With `add_generation_prompt`, the template appends the opening of an
    /// assistant turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::Render(describe(&e)))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| match raised_message(&e) {
            Some(msg) => ChatError::Raised(msg),
            None => ChatError::Render(describe(&e)),
        })
    }

    /// The template's Jinja source (what a cloud prompt's template digest is computed over).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The BOS text the template sees.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The EOS text the template sees.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// An error's message with its location and cause chain.
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        let _ = write!(s, ": {cause}");
        src = cause.source();
    }
    s
}

fn raised_message(e: &Error) -> Option<String> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = src {
        if let Some(r) = err.downcast_ref::<Raised>() {
            return Some(r.0.clone());
        }
        src = err.source();
    }
    None
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
}

// ---------------------------------------------------------------------------------------------------
// strftime_now
// ---------------------------------------------------------------------------------------------------

fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&fmt, secs)
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// C `strftime` for a UTC time (seconds since the epoch), covering the common conversions plus the
/// glibc `%-d` style no-padding flag. Unknown conversions are copied through.
fn strftime(fmt: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, min, sec) = (sod / 3600, (sod / 60) % 60, sod % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday; 0 = Monday
    let (y0, _, _) = civil_from_days(days);
    let jan1 = days_from_civil(y0, 1, 1);
    let yday = days - jan1 + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(fmt.len() + 16);
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        let num = |out: &mut String, v: i64, width: usize| {
            if no_pad {
                let _ = write!(out, "{v}");
            } else {
                let _ = write!(out, "{v:0width$}");
            }
        };
        match spec {
            'Y' => {
                let _ = write!(out, "{year}");
            }
            'y' => num(&mut out, year.rem_euclid(100), 2),
            'm' => num(&mut out, month as i64, 2),
            'd' => num(&mut out, day as i64, 2),
            'e' => {
                let _ = write!(out, "{day:>2}");
            }
            'H' => num(&mut out, hour, 2),
            'I' => num(&mut out, hour12, 2),
            'M' => num(&mut out, min, 2),
            'S' => num(&mut out, sec, 2),
            'j' => num(&mut out, yday, 3),
            'p' => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            'B' => out.push_str(MONTHS[month as usize - 1]),
            'b' | 'h' => out.push_str(&MONTHS[month as usize - 1][..3]),
            'A' => out.push_str(WEEKDAYS[weekday]),
            'a' => out.push_str(&WEEKDAYS[weekday][..3]),
            'u' => {
                let _ = write!(out, "{}", weekday + 1);
            }
            'w' => {
                let _ = write!(out, "{}", (weekday + 1) % 7);
            }
            'F' => {
                let _ = write!(out, "{year}-{month:02}-{day:02}");
            }
            'T' => {
                let _ = write!(out, "{hour:02}:{min:02}:{sec:02}");
            }
            'R' => {
                let _ = write!(out, "{hour:02}:{min:02}");
            }
            'D' => {
                let _ = write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100));
            }
            'Z' => out.push_str("UTC"),
            'z' => out.push_str("+0000"),
            'n' => out.push('\n'),
            't' => out.push('\t'),
            '%' => out.push('%'),
            other => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

/// Inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// ---------------------------------------------------------------------------------------------------
// tojson (Python json.dumps)
// ---------------------------------------------------------------------------------------------------

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be an integer",
                    )
                })?;
                Some(" ".repeat(n.max(0) as usize))
            }
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ))
            }
        },
    };
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let (mut item_sep, mut key_sep) = if indent.is_some() {
        (",".to_string(), ": ".to_string())
    } else {
        (", ".to_string(), ": ".to_string())
    };
    if let Some(seps) = separators.filter(|v| !v.is_none() && !v.is_undefined()) {
        let a = seps.get_item_by_index(0)?;
        let b = seps.get_item_by_index(1)?;
        match (a.as_str(), b.as_str()) {
            (Some(a), Some(b)) => {
                item_sep = a.to_string();
                key_sep = b.to_string();
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a pair of strings",
                ))
            }
        }
    }
    kwargs.assert_all_used()?;
    let opts = JsonOpts {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    json_value(value, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn json_newline(opts: &JsonOpts, level: usize, out: &mut String) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn json_value(v: &Value, opts: &JsonOpts, level: usize, out: &mut String) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => json_number(v, out),
        ValueKind::String => json_string(v.as_str().unwrap_or_default(), opts.ensure_ascii, out),
        ValueKind::Bytes => json_string(
            &String::from_utf8_lossy(v.as_bytes().unwrap_or_default()),
            opts.ensure_ascii,
            out,
        ),
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in v.try_iter()? {
                let item = v.get_item(&key)?;
                entries.push((json_key(&key), item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (k, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                json_newline(opts, level + 1, out);
                json_string(k, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                json_value(item, opts, level + 1, out)?;
            }
            json_newline(opts, level, out);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                json_newline(opts, level + 1, out);
                json_value(item, opts, level + 1, out)?;
            }
            json_newline(opts, level, out);
            out.push(']');
        }
        _ => json_string(&v.to_string(), opts.ensure_ascii, out),
    }
    Ok(())
}

/// A map key as Python's json.dumps converts it to a string.
fn json_key(key: &Value) -> String {
    match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::None | ValueKind::Undefined => "null".to_string(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::Number => {
            let mut s = String::new();
            json_number(key, &mut s);
            s
        }
        _ => key.to_string(),
    }
}

fn json_number(v: &Value, out: &mut String) {
    if v.is_integer() {
        let _ = write!(out, "{v}");
        return;
    }
    match f64::try_from(v.clone()) {
        Ok(f) => out.push_str(&python_float_repr(f)),
        Err(_) => {
            let _ = write!(out, "{v}");
        }
    }
}

/// Python's `repr(float)` (as json.dumps writes floats): shortest round-trip digits, scientific notation
/// outside 1e-4 <= |x| < 1e16, always a `.0` for integral values.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Shortest round-trip digits and decimal exponent from Rust's `{:e}`.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let neg = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let mut s = String::new();
    if neg {
        s.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp < 0 {
            s.push_str("0.");
            for _ in 0..(-exp - 1) {
                s.push('0');
            }
            s.push_str(&digits);
        } else {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                s.push_str(&digits);
                for _ in digits.len()..int_len {
                    s.push('0');
                }
                s.push_str(".0");
            } else {
                s.push_str(&digits[..int_len]);
                s.push('.');
                s.push_str(&digits[int_len..]);
            }
        }
    } else {
        s.push_str(&digits[..1]);
        if digits.len() > 1 {
            s.push('.');
            s.push_str(&digits[1..]);
        }
        let _ = write!(s, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    s
}

fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7E => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msgs(v: &[(&str, &str)]) -> Vec<ChatMessage> {
        v.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
    }

    #[test]
    fn template_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
    }

    #[test]
    fn smollm2_template_inserts_default_system() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&msgs(&[("user", "Hi")]), true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(&msgs(&[("system", "S"), ("user", "U")]), false)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        );
    }

    #[test]
    fn raise_exception_is_reported() {
        let src = "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
        let t = ChatTemplate::new(src, "", "").unwrap();
        match t.render(&msgs(&[("assistant", "x")]), false) {
            Err(ChatError::Raised(m)) => assert_eq!(m, "Conversation must start with user"),
            other => panic!("unexpected: {other:?}"),
        }
        assert_eq!(t.render(&msgs(&[("user", "x")]), false).unwrap(), "ok");
    }

    #[test]
    fn python_methods_and_whitespace_control() {
        let src = "{% for m in messages %}\n  {% if m.content.strip().startswith('a') %}\n[{{ m.content.strip() | upper }}]\n  {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let out = t
            .render(&msgs(&[("user", "  abc  "), ("user", "xyz")]), false)
            .unwrap();
        assert_eq!(out, "[ABC]\n");
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", ""),
            Err(ChatError::Syntax(_))
        ));
    }

    #[test]
    fn loop_controls_work() {
        let src = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(
            t.render(&msgs(&[("a", ""), ("b", "")]), false).unwrap(),
            "a"
        );
    }

    #[test]
    fn tojson_matches_python() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }}|{{ [1, 2.5, none, true, 'é\"\n'] | tojson }}|{{ {'b': 1, 'a': [ ]} | tojson(indent=2, sort_keys=true) }}",
            "",
            "",
        )
        .unwrap();
        let out = t.render(&msgs(&[("user", "hi")]), false).unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"hi\"}|[1, 2.5, null, true, \"é\\\"\\n\"]|{\n  \"a\": [],\n  \"b\": 1\n}"
        );
    }

    #[test]
    fn float_repr() {
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(0.1), "0.1");
        assert_eq!(python_float_repr(1e-5), "1e-05");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(123456.789), "123456.789");
        assert_eq!(python_float_repr(-0.00012), "-0.00012");
    }

    #[test]
    fn strftime_formats() {
        // 2024-07-26 13:25:09 UTC (a Friday).
        let secs = 1_722_000_309;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", secs), "2024-07-26 13:25:09");
        assert_eq!(strftime("%d %b %Y", secs), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %-d, %I%p %j", secs),
            "Friday July 26, 01PM 208"
        );
        assert_eq!(strftime("%F %T %%", 0), "1970-01-01 00:00:00 %");
        assert_eq!(days_from_civil(2024, 7, 26), 19_930);
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}", "", "").unwrap();
        let y = t.render(&[], false).unwrap();
        assert!(y.len() == 4 && y.starts_with('2'), "{y}");
    }
}
