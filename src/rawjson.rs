//! JSON text carried as it was sent. `serde_json::Value` holds numbers as
//! 64-bit integers or doubles, so a 30-digit integer or a long decimal in a
//! JSON column would be rounded on its way through; the row's own text is
//! kept instead, with only the whitespace outside strings removed (a JSON
//! number's digits, and every string, stay byte for byte).

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The `row` object of an envelope or an offline line, as text.
#[derive(Deserialize)]
struct WithRow<'a> {
    #[serde(borrow)]
    row: &'a RawValue,
}

/// The `row` object of an envelope or an offline line, as text; None when
/// the line has no single `row` member.
pub fn row_text(line: &[u8]) -> Option<&RawValue> {
    serde_json::from_slice::<WithRow<'_>>(line)
        .ok()
        .map(|w| w.row)
}

/// The `row` object's members as text, by name.
pub fn row_members(line: &[u8]) -> Option<HashMap<String, &RawValue>> {
    #[derive(Deserialize)]
    struct Members<'a> {
        #[serde(borrow)]
        row: HashMap<String, &'a RawValue>,
    }
    serde_json::from_slice::<Members<'_>>(line)
        .ok()
        .map(|m| m.row)
}

/// Valid JSON text without the whitespace between its tokens.
pub fn minify(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minified_text_keeps_strings_and_digits() {
        let text = "{ \"a\" : [ 1 ,\n 123456789012345678901234 ],\t\"b\\\" c\": \" x \\\\\" , \"d\": 0.1234567890123456789012345678901 }";
        assert_eq!(
            minify(text),
            r#"{"a":[1,123456789012345678901234],"b\" c":" x \\","d":0.1234567890123456789012345678901}"#
        );
        let v: serde_json::Value = serde_json::from_str(&minify(text)).unwrap();
        let w: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v, w);
    }

    #[test]
    fn the_row_of_a_line() {
        let line = br#"{"table":"t","row":{"j": {"n": 1e40, "s": "\u00e9"}, "k": 1},"counter":3}"#;
        assert_eq!(
            row_text(line).map(|r| r.get()),
            Some(r#"{"j": {"n": 1e40, "s": "\u00e9"}, "k": 1}"#)
        );
        let m = row_members(line).unwrap();
        assert_eq!(m["j"].get(), r#"{"n": 1e40, "s": "\u00e9"}"#);
        assert_eq!(m["k"].get(), "1");
        assert!(row_text(br#"{"table":"t"}"#).is_none());
        assert!(row_text(br#"{"row":{},"row":{}}"#).is_none());
    }
}
