//! The byte format of a `decide` input, readable so that seeds are reviewable:
//!
//! ```text
//! # want: bad_signature          (optional; comments start with '#')
//! POST /ai/v2/code/completions   (method, one space, path)
//! authorization: Bearer eyJ...   (name ':' one optional space, value)
//! x-gitlab-realm: self-managed
//! ```
//!
//! Lines end with `\n`. In every field `\\`, `\n`, `\r` and `\xHH` are escapes, so a value
//! can hold any byte; other bytes (also invalid UTF-8) are taken as they are. Any byte
//! string parses to something: a fuzzer mutates freely.

/// One request for `decide`, with the decision a seed expects (if it says).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecideInput {
    pub want: Option<String>,
    pub method: Vec<u8>,
    pub path: Vec<u8>,
    /// In order, repeats kept; values as bytes (Envoy's `raw_value`).
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
}

impl DecideInput {
    pub fn parse(data: &[u8]) -> DecideInput {
        let mut input = DecideInput::default();
        let mut request_line = false;
        for line in data.split(|&b| b == b'\n') {
            if let Some(comment) = line.strip_prefix(b"#") {
                if let Some(want) = comment.trim_ascii().strip_prefix(b"want:") {
                    input.want = Some(String::from_utf8_lossy(want.trim_ascii()).into_owned());
                }
                continue;
            }
            if !request_line {
                request_line = true;
                let (method, path) = split_once(line, b' ');
                input.method = unescape(method);
                input.path = unescape(path);
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let (name, value) = split_once(line, b':');
            let value = value.strip_prefix(b" ").unwrap_or(value);
            input.headers.push((unescape(name), unescape(value)));
        }
        input
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(want) = &self.want {
            out.extend_from_slice(format!("# want: {want}\n").as_bytes());
        }
        escape_into(&mut out, &self.method, b" ");
        out.push(b' ');
        escape_into(&mut out, &self.path, b"");
        out.push(b'\n');
        for (name, value) in &self.headers {
            escape_into(&mut out, name, b":");
            out.extend_from_slice(b": ");
            escape_into(&mut out, value, b"");
            out.push(b'\n');
        }
        out
    }

    /// Headers as text, the way the gRPC layer decodes `raw_value` (invalid UTF-8 → U+FFFD).
    pub fn text_headers(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .map(|(k, v)| (lossy(k), lossy(v)))
            .collect()
    }

    /// Headers as Envoy's `headers` map: names lower-cased, repeats joined with a comma.
    pub fn joined_headers(&self) -> std::collections::HashMap<String, String> {
        let mut map = std::collections::HashMap::<String, String>::new();
        for (k, v) in self.text_headers() {
            map.entry(k.to_ascii_lowercase())
                .and_modify(|joined| {
                    joined.push(',');
                    joined.push_str(&v);
                })
                .or_insert(v);
        }
        map
    }
}

pub fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn split_once(line: &[u8], separator: u8) -> (&[u8], &[u8]) {
    match line.iter().position(|&b| b == separator) {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[]),
    }
}

fn escape_into(out: &mut Vec<u8>, bytes: &[u8], also: &[u8]) {
    for &b in bytes {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'#' if out.last().is_none_or(|&last| last == b'\n') => out.extend_from_slice(b"\\x23"),
            b if also.contains(&b) => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            b => out.push(b),
        }
    }
}

fn unescape(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            match bytes.get(i + 1) {
                Some(b'\\') => {
                    out.push(b'\\');
                    i += 2;
                    continue;
                }
                Some(b'n') => {
                    out.push(b'\n');
                    i += 2;
                    continue;
                }
                Some(b'r') => {
                    out.push(b'\r');
                    i += 2;
                    continue;
                }
                Some(b'x') => {
                    let hex = bytes
                        .get(i + 2..i + 4)
                        .and_then(|h| std::str::from_utf8(h).ok());
                    if let Some(value) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        out.push(value);
                        i += 4;
                        continue;
                    }
                }
                _ => {}
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}
