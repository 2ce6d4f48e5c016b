//! A Python pickle reader that builds a tree of values and runs nothing.
//!
//! Enough of the pickle machine (protocols 0 to 5) for what `torch.save`
//! writes: containers, numbers, strings, globals (kept as names, never
//! imported), calls (`REDUCE`, `NEWOBJ`, kept as a callable and its
//! arguments) and persistent ids (PyTorch's storages). Lists and dicts are
//! shared through the memo as in Python, so a dict that is filled after it
//! was memoised is seen filled wherever it is referenced.

use std::cell::RefCell;
use std::io::Read;
use std::rc::Rc;

/// A value of the pickle machine.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer beyond 64 bits, little-endian two's complement bytes.
    BigInt(Vec<u8>),
    /// A float (its value is never needed).
    Float,
    Str(String),
    /// Bytes (their value is never needed).
    Bytes,
    Tuple(Rc<[Value]>),
    List(Rc<RefCell<Vec<Value>>>),
    /// A dict (or `OrderedDict`), its items in insertion order.
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// `module.name`, as named by `GLOBAL` or `STACK_GLOBAL`.
    Global {
        module: String,
        name: String,
    },
    /// `callable(*args)`, with the state that `BUILD` gave it.
    Call(Rc<Call>),
    /// `persistent_load(id)`.
    Persistent(Rc<Value>),
}

/// A call the pickle asks for, not made.
#[derive(Debug)]
pub struct Call {
    pub callable: Value,
    pub args: Value,
    pub state: RefCell<Option<Value>>,
}

impl Value {
    /// The `module.name` of a global, or of the callable of a call.
    pub fn global_name(&self) -> Option<String> {
        match self {
            Value::Global { module, name } => Some(format!("{module}.{name}")),
            _ => None,
        }
    }

    /// The integer, if this is one that fits 64 bits.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The items of a tuple or a list.
    pub fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(t) => Some(t.to_vec()),
            Value::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }

    /// A short description for messages: the type, and the name of a global or call.
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) | Value::BigInt(_) => "int".into(),
            Value::Float => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes => "bytes".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::List(_) => "list".into(),
            Value::Dict(_) => "dict".into(),
            Value::Global { module, name } => format!("{module}.{name}"),
            Value::Call(call) => format!("{}(...)", call.callable.kind()),
            Value::Persistent(_) => "persistent id".into(),
        }
    }
}

/// What went wrong, with the byte offset in the pickle.
#[derive(Debug)]
pub struct PickleError {
    pub offset: u64,
    pub msg: String,
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pickle byte {}: {}", self.offset, self.msg)
    }
}

/// Unpickles one object from `reader`, reading exactly up to its `STOP`.
pub fn load(reader: &mut impl Read) -> Result<Value, PickleError> {
    Machine {
        reader: Counting {
            inner: reader,
            offset: 0,
        },
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Vec::new(),
    }
    .run()
}

struct Counting<'a, R: Read> {
    inner: &'a mut R,
    offset: u64,
}

struct Machine<'a, R: Read> {
    reader: Counting<'a, R>,
    stack: Vec<Value>,
    /// Stack lengths at each `MARK`.
    marks: Vec<usize>,
    memo: Vec<Option<Value>>,
}

impl<R: Read> Machine<'_, R> {
    fn error<T>(&self, msg: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError {
            offset: self.reader.offset,
            msg: msg.into(),
        })
    }

    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, PickleError> {
        let mut buf = Vec::new();
        let read = (&mut *self.reader.inner)
            .take(n as u64)
            .read_to_end(&mut buf);
        self.reader.offset += buf.len() as u64;
        match read {
            Ok(_) if buf.len() == n => Ok(buf),
            Ok(_) => self.error(format!(
                "the pickle ends {} bytes into a {n}-byte argument",
                buf.len()
            )),
            Err(e) => self.error(format!("reading: {e}")),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        Ok(self.bytes(N)?.try_into().expect("N bytes"))
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn len64(&mut self) -> Result<usize, PickleError> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).or_else(|_| self.error(format!("length {n} does not fit in memory")))
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let mut line = Vec::new();
        loop {
            match self.u8()? {
                b'\n' => break,
                b => line.push(b),
            }
            if line.len() > 1 << 16 {
                return self.error("a text argument longer than 64 KiB");
            }
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        String::from_utf8(line).or_else(|_| self.error("a text argument that is not UTF-8"))
    }

    fn text(&mut self, bytes: Vec<u8>) -> Result<String, PickleError> {
        String::from_utf8(bytes).or_else(|_| self.error("a string that is not UTF-8"))
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return self.error("pop across a mark");
        }
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => self.error("pop from an empty stack"),
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        match self.marks.pop() {
            Some(mark) if mark <= self.stack.len() => Ok(self.stack.split_off(mark)),
            _ => self.error("no mark to pop to"),
        }
    }

    fn top(&mut self) -> Result<&Value, PickleError> {
        match self.stack.last() {
            Some(v) => Ok(v),
            None => Err(PickleError {
                offset: self.reader.offset,
                msg: "empty stack".into(),
            }),
        }
    }

    fn memo_put(&mut self, index: usize) -> Result<(), PickleError> {
        let value = self.top()?.clone();
        if index > 1 << 24 {
            return self.error(format!("memo index {index} out of range"));
        }
        if self.memo.len() <= index {
            self.memo.resize(index + 1, None);
        }
        self.memo[index] = Some(value);
        Ok(())
    }

    fn memo_get(&mut self, index: usize) -> Result<(), PickleError> {
        match self.memo.get(index).cloned().flatten() {
            Some(v) => {
                self.stack.push(v);
                Ok(())
            }
            None => self.error(format!("memo entry {index} was never stored")),
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return self.error("an odd number of dict keys and values");
        }
        match self.top()? {
            Value::Dict(d) => {
                let mut d = d.borrow_mut();
                let mut items = items.into_iter();
                while let (Some(k), Some(v)) = (items.next(), items.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            other => {
                let kind = other.kind();
                self.error(format!("dict items set on a {kind}"))
            }
        }
    }

    fn append(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            // `set` and `bytearray` objects: their items are not needed.
            Value::Call(_) => Ok(()),
            other => {
                let kind = other.kind();
                self.error(format!("list items appended to a {kind}"))
            }
        }
    }

    /// `callable(*args)`: an empty dict for `OrderedDict()`, a recorded call otherwise.
    fn call(&mut self, callable: Value, args: Value) -> Value {
        let name = callable.global_name();
        if matches!(
            name.as_deref(),
            Some("collections.OrderedDict" | "builtins.dict" | "__builtin__.dict")
        ) {
            let items = args
                .items()
                .and_then(|a| a.into_iter().next())
                .and_then(|pairs| pairs.items());
            let pairs = items
                .unwrap_or_default()
                .into_iter()
                .filter_map(|pair| {
                    pair.items()
                        .filter(|p| p.len() == 2)
                        .map(|p| (p[0].clone(), p[1].clone()))
                })
                .collect();
            return Value::Dict(Rc::new(RefCell::new(pairs)));
        }
        Value::Call(Rc::new(Call {
            callable,
            args,
            state: RefCell::new(None),
        }))
    }

    fn int_text(&mut self, text: &str) -> Result<Value, PickleError> {
        match text.trim_end_matches('L') {
            "00" => Ok(Value::Bool(false)),
            "01" => Ok(Value::Bool(true)),
            t => t
                .parse()
                .map(Value::Int)
                .or_else(|_| self.error(format!("integer `{text}` out of range"))),
        }
    }

    fn long(&mut self, bytes: Vec<u8>) -> Value {
        if bytes.len() <= 8 {
            let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
            let mut buf = [if negative { 0xff } else { 0 }; 8];
            buf[..bytes.len()].copy_from_slice(&bytes);
            Value::Int(i64::from_le_bytes(buf))
        } else {
            Value::BigInt(bytes)
        }
    }

    fn run(mut self) -> Result<Value, PickleError> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return self.error(format!("pickle protocol {proto} (at most 5 exists)"));
                    }
                }
                0x95 => {
                    self.array::<8>()?; // FRAME: a length hint
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.stack.push(Value::Int(v.into()));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.stack.push(Value::Int(v.into()));
                }
                b'I' | b'L' => {
                    let line = self.line()?;
                    let v = self.int_text(&line)?;
                    self.stack.push(v);
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let bytes = self.bytes(n)?;
                    let v = self.long(bytes);
                    self.stack.push(v);
                }
                0x8b => {
                    let n = self.u32()? as usize;
                    let bytes = self.bytes(n)?;
                    let v = self.long(bytes);
                    self.stack.push(v);
                }
                b'G' => {
                    self.array::<8>()?;
                    self.stack.push(Value::Float);
                }
                b'F' => {
                    self.line()?;
                    self.stack.push(Value::Float);
                }
                b'X' | 0x8c | 0x8d | b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        0x8c | b'U' | b'C' => self.u8()? as usize,
                        0x8d | 0x8e | 0x96 => self.len64()?,
                        _ => self.u32()? as usize,
                    };
                    let bytes = self.bytes(n)?;
                    let v = match op {
                        b'X' | 0x8c | 0x8d => Value::Str(self.text(bytes)?),
                        // Python 2 strings: text when they decode.
                        b'T' | b'U' => String::from_utf8(bytes).map_or(Value::Bytes, Value::Str),
                        _ => Value::Bytes,
                    };
                    self.stack.push(v);
                }
                b'V' | b'S' => {
                    let line = self.line()?;
                    let text = if op == b'S' {
                        line.trim_matches(|c| c == '\'' || c == '"').to_string()
                    } else {
                        line
                    };
                    self.stack.push(Value::Str(text));
                }
                b')' => self.stack.push(Value::Tuple(Rc::from(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items.into()));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n + self.marks.last().copied().unwrap_or(0) {
                        return self.error("a tuple of more items than the stack holds");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items.into()));
                }
                b']' => self.stack.push(Value::List(Rc::default())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'}' => self.stack.push(Value::Dict(Rc::default())),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Dict(Rc::default()));
                    self.set_items(items)?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.set_items(vec![key, value])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                0x8f => {
                    let set = Value::Call(Rc::new(Call {
                        callable: Value::Global {
                            module: "builtins".into(),
                            name: "set".into(),
                        },
                        args: Value::Tuple(Rc::from(Vec::new())),
                        state: RefCell::new(None),
                    }));
                    self.stack.push(set);
                }
                0x90 => {
                    self.pop_mark()?; // ADDITEMS: a set's items are not needed
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items.into())); // FROZENSET
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global { module, name });
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => {
                            self.stack.push(Value::Global { module, name })
                        }
                        _ => return self.error("STACK_GLOBAL of something other than two strings"),
                    }
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(callable, args);
                    self.stack.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(callable, args);
                    self.stack.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    // A dict's state is its attributes (OrderedDict's
                    // `_metadata`), not items: left out.
                    if let Value::Call(call) = self.top()? {
                        *call.state.borrow_mut() = Some(state);
                    }
                }
                b'p' => {
                    let line = self.line()?;
                    let index = line
                        .parse()
                        .or_else(|_| self.error(format!("memo index `{line}`")))?;
                    self.memo_put(index)?;
                }
                b'q' => {
                    let index = self.u8()? as usize;
                    self.memo_put(index)?;
                }
                b'r' => {
                    let index = self.u32()? as usize;
                    self.memo_put(index)?;
                }
                0x94 => {
                    let index = self.memo.len();
                    self.memo_put(index)?;
                }
                b'g' => {
                    let line = self.line()?;
                    let index = line
                        .parse()
                        .or_else(|_| self.error(format!("memo index `{line}`")))?;
                    self.memo_get(index)?;
                }
                b'h' => {
                    let index = self.u8()? as usize;
                    self.memo_get(index)?;
                }
                b'j' => {
                    let index = self.u32()? as usize;
                    self.memo_get(index)?;
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.stack.push(Value::Persistent(Rc::new(id)));
                }
                b'P' => {
                    let id = self.line()?;
                    self.stack.push(Value::Persistent(Rc::new(Value::Str(id))));
                }
                other => {
                    return self.error(format!(
                        "op-code 0x{other:02x} ({:?}), which PyTorch files do not use",
                        other as char
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpickle(bytes: &[u8]) -> Result<Value, PickleError> {
        load(&mut &bytes[..])
    }

    #[test]
    fn memoised_dicts_are_shared_and_filled_later() {
        // d = {}; l = [d, d]; d["k"] = 1; l — as EMPTY_DICT BINPUT 0, MARK,
        // BINGET 0, BINGET 0, LIST, BINPUT 1, BINGET 0, "k", 1, SETITEM, POP,
        // BINGET 1, STOP.
        let bytes = b"\x80\x02}q\x00(h\x00h\x00lq\x01h\x00X\x01\x00\x00\x00kK\x01s0h\x01.";
        let v = unpickle(bytes).unwrap();
        let Value::List(list) = v else {
            panic!("{v:?}")
        };
        for item in list.borrow().iter() {
            let Value::Dict(d) = item else {
                panic!("{item:?}")
            };
            assert_eq!(
                d.borrow().len(),
                1,
                "the dict filled after it was referenced"
            );
        }
    }

    #[test]
    fn longs_beyond_64_bits_and_negative_ones() {
        // PyTorch's legacy magic number, a 10-byte LONG1.
        let magic = unpickle(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.").unwrap();
        assert!(
            matches!(magic, Value::BigInt(ref b) if b == b"\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"),
            "{magic:?}"
        );
        assert_eq!(
            unpickle(b"\x80\x02\x8a\x01\xff.").unwrap().as_int(),
            Some(-1)
        );
        assert_eq!(
            unpickle(b"\x80\x02\x8a\x02\xe9\x03.").unwrap().as_int(),
            Some(1001)
        );
    }

    #[test]
    fn bad_pickles_say_where() {
        let e = unpickle(b"\x80\x02X\x05\x00\x00\x00ab").unwrap_err();
        assert_eq!(
            e.to_string(),
            "pickle byte 9: the pickle ends 2 bytes into a 5-byte argument"
        );
        let e = unpickle(b"\x80\x02\xff").unwrap_err();
        assert!(
            e.to_string().starts_with("pickle byte 3: op-code 0xff"),
            "{e}"
        );
        let e = unpickle(b"\x80\x02h\x07.").unwrap_err();
        assert!(
            e.to_string().contains("memo entry 7 was never stored"),
            "{e}"
        );
        let e = unpickle(b"\x80\x02(0.").unwrap_err();
        assert!(e.to_string().contains("pop across a mark"), "{e}");
    }
}
