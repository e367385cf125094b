//! A small, fast JSON scanner for the few fields the picker needs.
//!
//! It does not build a document: it walks the bytes once, hands out string values as borrowed
//! slices when they hold no escapes (the common case), and skips everything else with `memchr`.
//! The caller validates UTF-8 of the whole body once, so string slices are valid UTF-8.

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    pub offset: usize,
    pub message: &'static str,
}

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at byte {}", self.message, self.offset)
    }
}

pub type JsonResult<T> = Result<T, JsonError>;

/// Nesting deeper than this is refused, so hostile input cannot exhaust the stack.
const MAX_DEPTH: usize = 128;

pub struct Scanner<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn err<T>(&self, message: &'static str) -> JsonResult<T> {
        Err(JsonError {
            offset: self.pos,
            message,
        })
    }

    pub fn skip_ws(&mut self) {
        while let Some(&b) = self.buf.get(self.pos) {
            if matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    /// The next non-whitespace byte, not consumed.
    pub fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.buf.get(self.pos).copied()
    }

    pub fn expect(&mut self, byte: u8, message: &'static str) -> JsonResult<()> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            self.err(message)
        }
    }

    /// After the opening `{` or `[` (and after each member), consumes `,` and reports whether
    /// another member follows, or consumes the closing byte and reports `false`.
    pub fn next_member(&mut self, close: u8, first: &mut bool) -> JsonResult<bool> {
        match self.peek() {
            Some(b) if b == close => {
                self.pos += 1;
                Ok(false)
            }
            Some(b',') if !*first => {
                self.pos += 1;
                Ok(true)
            }
            Some(_) if *first => {
                *first = false;
                Ok(true)
            }
            Some(_) => self.err("expected ',' or a closing bracket"),
            None => self.err("unexpected end of input"),
        }
    }

    /// Reads an object key and the `:` after it.
    pub fn key(&mut self) -> JsonResult<Cow<'a, [u8]>> {
        if self.peek() != Some(b'"') {
            return self.err("expected a string key");
        }
        let key = self.string()?;
        self.expect(b':', "expected ':' after key")?;
        Ok(key)
    }

    /// Reads a string value (the scanner must be at its opening quote).
    pub fn string(&mut self) -> JsonResult<Cow<'a, [u8]>> {
        if self.peek() != Some(b'"') {
            return self.err("expected a string");
        }
        self.pos += 1;
        let start = self.pos;
        match memchr::memchr2(b'"', b'\\', &self.buf[start..]) {
            Some(n) if self.buf[start + n] == b'"' => {
                self.pos = start + n + 1;
                Ok(Cow::Borrowed(&self.buf[start..start + n]))
            }
            Some(n) => {
                // Find the closing quote first so the decoded copy is allocated once, at its
                // upper bound (escapes only shrink).
                self.pos = start + n;
                let end = self.string_end()?;
                let mut out = Vec::with_capacity(end - start);
                out.extend_from_slice(&self.buf[start..start + n]);
                self.unescape_rest(&mut out)?;
                Ok(Cow::Owned(out))
            }
            None => self.err("unterminated string"),
        }
    }

    /// The offset of the closing quote of the string the scanner is inside, not consumed.
    fn string_end(&self) -> JsonResult<usize> {
        let mut pos = self.pos;
        loop {
            let rest = self.buf.get(pos..).unwrap_or_default();
            match memchr::memchr2(b'"', b'\\', rest) {
                Some(n) if rest[n] == b'"' => return Ok(pos + n),
                Some(n) => pos += n + 2,
                None => return self.err("unterminated string"),
            }
        }
    }

    /// Continues a string at a backslash, appending decoded bytes until the closing quote.
    fn unescape_rest(&mut self, out: &mut Vec<u8>) -> JsonResult<()> {
        loop {
            match self.buf.get(self.pos) {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    let esc = *self.buf.get(self.pos + 1).ok_or(JsonError {
                        offset: self.pos,
                        message: "unterminated escape",
                    })?;
                    self.pos += 2;
                    match esc {
                        b'"' => out.push(b'"'),
                        b'\\' => out.push(b'\\'),
                        b'/' => out.push(b'/'),
                        b'b' => out.push(0x08),
                        b'f' => out.push(0x0c),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => self.unicode_escape(out)?,
                        _ => return self.err("invalid escape"),
                    }
                }
                Some(_) => {
                    let rest = &self.buf[self.pos..];
                    let n = memchr::memchr2(b'"', b'\\', rest).ok_or(JsonError {
                        offset: self.pos,
                        message: "unterminated string",
                    })?;
                    out.extend_from_slice(&rest[..n]);
                    self.pos += n;
                }
                None => return self.err("unterminated string"),
            }
        }
    }

    fn hex4(&mut self) -> JsonResult<u32> {
        let digits = self.buf.get(self.pos..self.pos + 4).ok_or(JsonError {
            offset: self.pos,
            message: "short \\u escape",
        })?;
        let mut value = 0u32;
        for &d in digits {
            let v = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return self.err("bad hex digit in \\u escape"),
            };
            value = value * 16 + u32::from(v);
        }
        self.pos += 4;
        Ok(value)
    }

    /// Decodes `\uXXXX` (after the `\u`), pairing surrogates; lone surrogates become U+FFFD.
    fn unicode_escape(&mut self, out: &mut Vec<u8>) -> JsonResult<()> {
        let first = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&first) {
            if self.buf.get(self.pos..self.pos + 2) == Some(b"\\u") {
                let save = self.pos;
                self.pos += 2;
                let second = self.hex4()?;
                if (0xDC00..0xE000).contains(&second) {
                    0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
                } else {
                    self.pos = save;
                    0xFFFD
                }
            } else {
                0xFFFD
            }
        } else if (0xDC00..0xE000).contains(&first) {
            0xFFFD
        } else {
            first
        };
        let ch = char::from_u32(code).unwrap_or('\u{FFFD}');
        let mut tmp = [0u8; 4];
        out.extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
        Ok(())
    }

    /// Reads `true` or `false`.
    pub fn boolean(&mut self) -> JsonResult<bool> {
        self.skip_ws();
        let rest = &self.buf[self.pos..];
        if rest.starts_with(b"true") {
            self.pos += 4;
            Ok(true)
        } else if rest.starts_with(b"false") {
            self.pos += 5;
            Ok(false)
        } else {
            self.err("expected a boolean")
        }
    }

    /// Skips any value and returns the raw bytes it spanned.
    pub fn skip_value(&mut self) -> JsonResult<&'a [u8]> {
        self.skip_ws();
        let start = self.pos;
        self.skip_value_at(0)?;
        Ok(&self.buf[start..self.pos])
    }

    fn skip_value_at(&mut self, depth: usize) -> JsonResult<()> {
        if depth > MAX_DEPTH {
            return self.err("nesting too deep");
        }
        match self.peek() {
            Some(b'"') => {
                self.skip_string()?;
            }
            Some(open @ (b'{' | b'[')) => {
                let close = if open == b'{' { b'}' } else { b']' };
                self.pos += 1;
                let mut first = true;
                while self.next_member(close, &mut first)? {
                    if open == b'{' {
                        self.skip_string()?;
                        self.expect(b':', "expected ':' after key")?;
                    }
                    self.skip_value_at(depth + 1)?;
                }
            }
            Some(b't' | b'f' | b'n' | b'-' | b'0'..=b'9') => {
                let start = self.pos;
                while let Some(&b) = self.buf.get(self.pos) {
                    if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.') {
                        self.pos += 1;
                    } else {
                        break;
                    }
                }
                let word = &self.buf[start..self.pos];
                let is_literal = matches!(word, b"true" | b"false" | b"null");
                let is_number = word[0] == b'-' || word[0].is_ascii_digit();
                if !(is_literal || is_number) {
                    return self.err("invalid literal");
                }
            }
            Some(_) => return self.err("unexpected byte"),
            None => return self.err("unexpected end of input"),
        }
        Ok(())
    }

    /// Skips a string without decoding it.
    fn skip_string(&mut self) -> JsonResult<()> {
        if self.peek() != Some(b'"') {
            return self.err("expected a string");
        }
        self.pos += 1;
        self.pos = self.string_end()? + 1;
        Ok(())
    }

    /// Errors unless only whitespace remains.
    pub fn finish(&mut self) -> JsonResult<()> {
        if self.peek().is_some() {
            self.err("trailing data after the JSON value")
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowed_string_without_escapes() {
        let mut s = Scanner::new(br#""hello" "#);
        assert!(matches!(s.string().unwrap(), Cow::Borrowed(b"hello")));
    }

    #[test]
    fn unescapes_all_forms() {
        let mut s = Scanner::new(br#""a\"b\\c\/\n\t\u00e9\ud83d\ude00\ud800x""#);
        let v = s.string().unwrap();
        assert_eq!(
            std::str::from_utf8(&v).unwrap(),
            "a\"b\\c/\n\t\u{e9}\u{1F600}\u{FFFD}x"
        );
    }

    #[test]
    fn skips_nested_values_and_reports_span() {
        let mut s = Scanner::new(br#" {"a": [1, -2.5e3, true, null, {"b": "x\"y"}]} tail"#);
        let raw = s.skip_value().unwrap();
        assert_eq!(raw, br#"{"a": [1, -2.5e3, true, null, {"b": "x\"y"}]}"#);
        assert!(s.finish().is_err());
    }

    #[test]
    fn rejects_broken_input() {
        for bad in [
            &b"{"[..],
            b"[1,]",
            b"\"abc",
            b"{\"a\" 1}",
            b"tru",
            b"@",
            b"[1 2]",
            b"\"\\",
        ] {
            assert!(
                Scanner::new(bad).skip_value().is_err(),
                "{:?}",
                std::str::from_utf8(bad)
            );
        }
    }

    #[test]
    fn depth_is_bounded() {
        let deep = "[".repeat(10_000);
        assert_eq!(
            Scanner::new(deep.as_bytes())
                .skip_value()
                .unwrap_err()
                .message,
            "nesting too deep"
        );
    }
}
