//! The condition language of a metric check: a small subset of Argo Rollouts' `expr`
//! conditions, parsed into an AST and evaluated against a query's result (`Vec<f64>`).
//! Nothing is ever executed beyond this AST.
//!
//! Supported (see [`SUPPORTED`]): numbers, `true`/`false`, `result[N]`, bare `result` (a
//! one-element result), `len(result)`, `isNaN(x)`, `isInf(x)`, `default(result[N], x)`,
//! `+ - * /`, `< <= > >= == !=`, `!`/`not`, `&&`/`and`, `||`/`or`, parentheses.

use std::fmt;

/// What the parser accepts, for error messages.
pub const SUPPORTED: &str = "numbers, true/false, result[N], result, len(result), isNaN(x), \
isInf(x), default(result[N], x), + - * /, < <= > >= == !=, ! / not, && / and, || / or, ( )";

/// Longest condition accepted, in bytes.
const MAX_LEN: usize = 1024;
/// Deepest nesting accepted (parentheses, unary operators).
const MAX_DEPTH: usize = 32;

/// A condition that failed to parse: where, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("condition `{source_text}`: at column {column}: {message} (supported: {SUPPORTED})")]
pub struct ParseError {
    pub source_text: String,
    /// 1-based byte column.
    pub column: usize,
    pub message: String,
}

/// A condition that parsed but cannot be evaluated against this result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    #[error("result[{index}] is out of range: the query returned {len} value(s)")]
    OutOfRange { index: usize, len: usize },
    #[error("`result` without an index needs exactly one value; the query returned {0}")]
    NotSingle(usize),
    #[error("type mismatch: {0}")]
    Type(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
}

/// The parsed form of a condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Num(f64),
    Bool(bool),
    /// Bare `result`: the only value of a one-element result.
    Result,
    /// `result[N]`.
    Index(usize),
    /// `len(result)`.
    Len,
    IsNaN(Box<Expr>),
    IsInf(Box<Expr>),
    /// `default(result[N], x)`: `x` when `result[N]` does not exist.
    Default(usize, Box<Expr>),
    Not(Box<Expr>),
    Neg(Box<Expr>),
    Arith(ArithOp, Box<Expr>, Box<Expr>),
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Value {
    Num(f64),
    Bool(bool),
}

impl Expr {
    /// Parses a condition such as `result[0] >= 0.95 && len(result) > 0`.
    pub fn parse(src: &str) -> Result<Expr, ParseError> {
        if src.len() > MAX_LEN {
            return Err(ParseError {
                source_text: src.chars().take(64).collect::<String>() + "…",
                column: MAX_LEN,
                message: format!("longer than {MAX_LEN} bytes"),
            });
        }
        let tokens = lex(src)?;
        let mut p = Parser {
            src,
            tokens,
            pos: 0,
            depth: 0,
        };
        let e = p.or()?;
        if let Some(t) = p.tokens.get(p.pos) {
            return Err(p.err_at(t.at, format!("unexpected `{}`", t.text)));
        }
        if !matches!(
            e,
            Expr::Bool(_)
                | Expr::IsNaN(_)
                | Expr::IsInf(_)
                | Expr::Not(_)
                | Expr::Cmp(..)
                | Expr::And(..)
                | Expr::Or(..)
        ) {
            return Err(p.err_at(0, "the condition must be a comparison or a boolean".into()));
        }
        Ok(e)
    }

    /// Evaluates the condition against a query result.
    pub fn eval(&self, result: &[f64]) -> Result<bool, EvalError> {
        match self.value(result)? {
            Value::Bool(b) => Ok(b),
            Value::Num(n) => Err(EvalError::Type(format!(
                "the condition gave the number {n}, not true/false"
            ))),
        }
    }

    fn value(&self, r: &[f64]) -> Result<Value, EvalError> {
        Ok(match self {
            Expr::Num(n) => Value::Num(*n),
            Expr::Bool(b) => Value::Bool(*b),
            Expr::Result => match r {
                [v] => Value::Num(*v),
                _ => return Err(EvalError::NotSingle(r.len())),
            },
            Expr::Index(i) => Value::Num(*r.get(*i).ok_or(EvalError::OutOfRange {
                index: *i,
                len: r.len(),
            })?),
            Expr::Len => Value::Num(r.len() as f64),
            Expr::IsNaN(e) => Value::Bool(e.num(r)?.is_nan()),
            Expr::IsInf(e) => Value::Bool(e.num(r)?.is_infinite()),
            Expr::Default(i, e) => match r.get(*i) {
                Some(v) => Value::Num(*v),
                None => Value::Num(e.num(r)?),
            },
            Expr::Not(e) => Value::Bool(!e.boolean(r)?),
            Expr::Neg(e) => Value::Num(-e.num(r)?),
            Expr::Arith(op, a, b) => {
                let (a, b) = (a.num(r)?, b.num(r)?);
                Value::Num(match op {
                    ArithOp::Add => a + b,
                    ArithOp::Sub => a - b,
                    ArithOp::Mul => a * b,
                    ArithOp::Div => a / b,
                })
            }
            Expr::Cmp(op, a, b) => match (a.value(r)?, b.value(r)?) {
                (Value::Num(a), Value::Num(b)) => Value::Bool(match op {
                    CmpOp::Lt => a < b,
                    CmpOp::Le => a <= b,
                    CmpOp::Gt => a > b,
                    CmpOp::Ge => a >= b,
                    CmpOp::Eq => a == b,
                    CmpOp::Ne => a != b,
                }),
                (Value::Bool(a), Value::Bool(b)) if matches!(op, CmpOp::Eq | CmpOp::Ne) => {
                    Value::Bool((a == b) == (*op == CmpOp::Eq))
                }
                _ => return Err(EvalError::Type("comparing a number with a boolean".into())),
            },
            // Short-circuit, like expr: `len(result) > 0 && result[0] > 1` is safe.
            Expr::And(a, b) => Value::Bool(a.boolean(r)? && b.boolean(r)?),
            Expr::Or(a, b) => Value::Bool(a.boolean(r)? || b.boolean(r)?),
        })
    }

    fn num(&self, r: &[f64]) -> Result<f64, EvalError> {
        match self.value(r)? {
            Value::Num(n) => Ok(n),
            Value::Bool(_) => Err(EvalError::Type("a boolean where a number is needed".into())),
        }
    }

    fn boolean(&self, r: &[f64]) -> Result<bool, EvalError> {
        match self.value(r)? {
            Value::Bool(b) => Ok(b),
            Value::Num(_) => Err(EvalError::Type("a number where a boolean is needed".into())),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Num(f64),
    Ident,
    Op,
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    text: String,
    at: usize,
}

fn lex(src: &str) -> Result<Vec<Token>, ParseError> {
    let err = |at: usize, message: String| ParseError {
        source_text: src.to_string(),
        column: at + 1,
        message,
    };
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            while i < b.len()
                && (b[i].is_ascii_digit()
                    || b[i] == b'.'
                    || b[i] == b'e'
                    || b[i] == b'E'
                    || ((b[i] == b'+' || b[i] == b'-') && matches!(b[i - 1], b'e' | b'E')))
            {
                i += 1;
            }
            let text = &src[start..i];
            let n: f64 = text
                .parse()
                .map_err(|_| err(start, format!("`{text}` is not a number")))?;
            out.push(Token {
                kind: Kind::Num(n),
                text: text.into(),
                at: start,
            });
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Token {
                kind: Kind::Ident,
                text: src[start..i].into(),
                at: start,
            });
            continue;
        }
        let two = src.get(i..i + 2).unwrap_or("");
        let len = if matches!(two, ">=" | "<=" | "==" | "!=" | "&&" | "||") {
            2
        } else if b"<>!+-*/()[],".contains(&c) {
            1
        } else {
            let ch = src[i..].chars().next().unwrap_or('?');
            return Err(err(i, format!("unsupported character `{ch}`")));
        };
        i += len;
        out.push(Token {
            kind: Kind::Op,
            text: src[start..i].into(),
            at: start,
        });
    }
    Ok(out)
}

struct Parser<'a> {
    src: &'a str,
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn err_at(&self, at: usize, message: String) -> ParseError {
        ParseError {
            source_text: self.src.to_string(),
            column: at + 1,
            message,
        }
    }

    fn err_here(&self, message: &str) -> ParseError {
        match self.tokens.get(self.pos) {
            Some(t) => self.err_at(t.at, format!("{message}, found `{}`", t.text)),
            None => self.err_at(self.src.len(), format!("{message}, found the end")),
        }
    }

    fn peek_is(&self, texts: &[&str]) -> Option<String> {
        let t = self.tokens.get(self.pos)?;
        (!matches!(t.kind, Kind::Num(_)) && texts.contains(&t.text.as_str()))
            .then(|| t.text.clone())
    }

    fn expect(&mut self, text: &str) -> Result<(), ParseError> {
        if self.peek_is(&[text]).is_some() {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err_here(&format!("expected `{text}`")))
        }
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err_here(&format!("nested deeper than {MAX_DEPTH}")));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        let mut e = self.and()?;
        while self.peek_is(&["||", "or"]).is_some() {
            self.pos += 1;
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut e = self.not()?;
        while self.peek_is(&["&&", "and"]).is_some() {
            self.pos += 1;
            e = Expr::And(Box::new(e), Box::new(self.not()?));
        }
        Ok(e)
    }

    fn not(&mut self) -> Result<Expr, ParseError> {
        if self.peek_is(&["!", "not"]).is_some() {
            self.pos += 1;
            self.enter()?;
            let e = Expr::Not(Box::new(self.not()?));
            self.depth -= 1;
            return Ok(e);
        }
        self.cmp()
    }

    fn cmp(&mut self) -> Result<Expr, ParseError> {
        let a = self.sum()?;
        let Some(op) = self.peek_is(&["<", "<=", ">", ">=", "==", "!="]) else {
            return Ok(a);
        };
        self.pos += 1;
        let op = match op.as_str() {
            "<" => CmpOp::Lt,
            "<=" => CmpOp::Le,
            ">" => CmpOp::Gt,
            ">=" => CmpOp::Ge,
            "==" => CmpOp::Eq,
            _ => CmpOp::Ne,
        };
        let b = self.sum()?;
        if self.peek_is(&["<", "<=", ">", ">=", "==", "!="]).is_some() {
            return Err(self.err_here("comparisons do not chain; use &&"));
        }
        Ok(Expr::Cmp(op, Box::new(a), Box::new(b)))
    }

    fn sum(&mut self) -> Result<Expr, ParseError> {
        let mut e = self.product()?;
        while let Some(op) = self.peek_is(&["+", "-"]) {
            self.pos += 1;
            let op = if op == "+" {
                ArithOp::Add
            } else {
                ArithOp::Sub
            };
            e = Expr::Arith(op, Box::new(e), Box::new(self.product()?));
        }
        Ok(e)
    }

    fn product(&mut self) -> Result<Expr, ParseError> {
        let mut e = self.unary()?;
        while let Some(op) = self.peek_is(&["*", "/"]) {
            self.pos += 1;
            let op = if op == "*" {
                ArithOp::Mul
            } else {
                ArithOp::Div
            };
            e = Expr::Arith(op, Box::new(e), Box::new(self.unary()?));
        }
        Ok(e)
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        if self.peek_is(&["-"]).is_some() {
            self.pos += 1;
            self.enter()?;
            let e = Expr::Neg(Box::new(self.unary()?));
            self.depth -= 1;
            return Ok(e);
        }
        self.primary()
    }

    fn index(&mut self) -> Result<usize, ParseError> {
        self.expect("[")?;
        let i = match self.tokens.get(self.pos) {
            Some(Token {
                kind: Kind::Num(n), ..
            }) if n.fract() == 0.0 && *n >= 0.0 && *n < 1e6 => *n as usize,
            _ => return Err(self.err_here("expected a whole-number index")),
        };
        self.pos += 1;
        self.expect("]")?;
        Ok(i)
    }

    fn primary(&mut self) -> Result<Expr, ParseError> {
        let Some(t) = self.tokens.get(self.pos).cloned() else {
            return Err(self.err_here("expected a value"));
        };
        self.pos += 1;
        match (&t.kind, t.text.as_str()) {
            (Kind::Num(n), _) => Ok(Expr::Num(*n)),
            (Kind::Op, "(") => {
                self.enter()?;
                let e = self.or()?;
                self.depth -= 1;
                self.expect(")")?;
                Ok(e)
            }
            (Kind::Ident, "true") => Ok(Expr::Bool(true)),
            (Kind::Ident, "false") => Ok(Expr::Bool(false)),
            (Kind::Ident, "result") => {
                if self.peek_is(&["["]).is_some() {
                    Ok(Expr::Index(self.index()?))
                } else {
                    Ok(Expr::Result)
                }
            }
            (Kind::Ident, "len") => {
                self.expect("(")?;
                self.expect("result")?;
                self.expect(")")?;
                Ok(Expr::Len)
            }
            (Kind::Ident, f @ ("isNaN" | "isInf")) => {
                let nan = f == "isNaN";
                self.expect("(")?;
                self.enter()?;
                let e = Box::new(self.sum()?);
                self.depth -= 1;
                self.expect(")")?;
                Ok(if nan { Expr::IsNaN(e) } else { Expr::IsInf(e) })
            }
            (Kind::Ident, "default") => {
                self.expect("(")?;
                self.expect("result")?;
                let i = self.index()?;
                self.expect(",")?;
                self.enter()?;
                let e = self.sum()?;
                self.depth -= 1;
                self.expect(")")?;
                Ok(Expr::Default(i, Box::new(e)))
            }
            (Kind::Ident, name) => Err(self.err_at(t.at, format!("unknown name `{name}`"))),
            (_, other) => Err(self.err_at(t.at, format!("unexpected `{other}`"))),
        }
    }
}

impl fmt::Display for CmpOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(src: &str, r: &[f64]) -> Result<bool, EvalError> {
        Expr::parse(src).expect("parses").eval(r)
    }

    #[test]
    fn argo_examples_evaluate() {
        assert_eq!(eval("result[0] >= 0.95", &[0.97]), Ok(true));
        assert_eq!(eval("result[0] >= 0.95", &[0.9]), Ok(false));
        assert_eq!(eval("result[0] < 5", &[4.0]), Ok(true));
        assert_eq!(eval("len(result) > 0", &[]), Ok(false));
        assert_eq!(eval("len(result) > 0", &[1.0]), Ok(true));
        assert_eq!(eval("isNaN(result[0])", &[f64::NAN]), Ok(true));
        assert_eq!(
            eval("isNaN(result[0]) || result[0] >= 0.95", &[f64::NAN]),
            Ok(true)
        );
        assert_eq!(
            eval("result[0] >= 0.9 && result[1] < 0.1", &[0.95, 0.05]),
            Ok(true)
        );
        assert_eq!(
            eval("result[0] >= 0.9 and not (result[1] < 0.1)", &[0.95, 0.05]),
            Ok(false)
        );
        assert_eq!(eval("result >= 0.95", &[0.99]), Ok(true));
        assert_eq!(eval("default(result[0], 0) >= 0.95", &[]), Ok(false));
        assert_eq!(eval("default(result[0], 1) >= 0.95", &[]), Ok(true));
        assert_eq!(eval("result[0] * 100 > 99", &[0.995]), Ok(true));
        assert_eq!(eval("-result[0] < -1e-3", &[0.5]), Ok(true));
        assert_eq!(eval("isInf(result[0])", &[f64::INFINITY]), Ok(true));
        assert_eq!(eval("true", &[]), Ok(true));
    }

    #[test]
    fn precedence_and_short_circuit() {
        // && binds tighter than ||.
        assert_eq!(eval("true || false && false", &[]), Ok(true));
        assert_eq!(eval("(true || false) && false", &[]), Ok(false));
        assert_eq!(eval("1 + 2 * 3 == 7", &[]), Ok(true));
        // The right side would be out of range, but is never evaluated.
        assert_eq!(eval("len(result) > 0 && result[0] > 1", &[]), Ok(false));
        assert_eq!(eval("len(result) == 0 || result[0] > 1", &[]), Ok(true));
    }

    #[test]
    fn nan_compares_false_like_go() {
        assert_eq!(eval("result[0] >= 0.95", &[f64::NAN]), Ok(false));
        assert_eq!(eval("result[0] < 0.95", &[f64::NAN]), Ok(false));
        assert_eq!(eval("result[0] != result[0]", &[f64::NAN]), Ok(true));
    }

    #[test]
    fn evaluation_errors_are_typed() {
        assert_eq!(
            eval("result[1] > 0", &[1.0]),
            Err(EvalError::OutOfRange { index: 1, len: 1 })
        );
        assert_eq!(
            eval("result > 0", &[1.0, 2.0]),
            Err(EvalError::NotSingle(2))
        );
        assert!(matches!(eval("true < 1", &[]), Err(EvalError::Type(_))));
        assert!(matches!(
            eval("!(1 + 1 == 2) == 3", &[]),
            Err(EvalError::Type(_))
        ));
    }

    #[test]
    fn unsupported_input_is_a_clear_parse_error() {
        for (src, needle) in [
            ("result[0] >= 0.95 ? 1 : 0", "unsupported character `?`"),
            ("all(result, {# > 0.9})", "unsupported character `{`"),
            ("sum(result) > 1", "unknown name `sum`"),
            ("result[0] >= ", "expected a value, found the end"),
            ("result[0]", "must be a comparison"),
            ("result[-1] > 0", "whole-number index"),
            ("result[0.5] > 0", "whole-number index"),
            ("1 < 2 < 3", "do not chain"),
            ("(result[0] > 1", "expected `)`"),
            ("result[0] > 1)", "unexpected `)`"),
            ("len(foo) > 0", "expected `result`"),
            ("result[0] = 1", "unsupported character `=`"),
            ("", "expected a value"),
        ] {
            let e = Expr::parse(src).expect_err(src);
            let msg = e.to_string();
            assert!(msg.contains(needle), "{src}: {msg}");
            assert!(msg.contains("supported:"), "{msg}");
        }
    }

    #[test]
    fn error_column_points_at_the_problem() {
        let e = Expr::parse("result[0] >= 0.95 && foo").expect_err("unknown");
        assert_eq!(e.column, 22);
    }

    #[test]
    fn hostile_input_is_bounded() {
        let deep = "(".repeat(100) + "true" + &")".repeat(100);
        assert!(
            Expr::parse(&deep)
                .expect_err("deep")
                .message
                .contains("nested")
        );
        let nots = "!".repeat(100) + "true";
        assert!(Expr::parse(&nots).is_err());
        let long = "true && ".repeat(200) + "true";
        assert!(
            Expr::parse(&long)
                .expect_err("long")
                .message
                .contains("longer")
        );
        assert!(Expr::parse("résult > 1").is_err());
    }
}
