//! Just enough of a BTF reader to find struct member offsets and tracepoint declarations in the
//! running kernel's /sys/kernel/btf/vmlinux. Rust BPF programs have no CO-RE relocations, so the
//! offsets they need are looked up here and handed to them at load time.
use thiserror::Error;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF at {VMLINUX}: {0}")]
    Read(#[from] std::io::Error),
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF struct {0} has no member {1}")]
    NoMember(String, String),
}

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone, Copy)]
struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
}

/// One type: names are offsets into the string section, members a range of `members`.
#[derive(Debug, Clone, Copy)]
struct Type {
    kind: u8,
    name: u32,
    /// The referenced type for typedef/const/volatile/pointer-like kinds and functions.
    referenced: u32,
    /// Member, parameter or value count.
    vlen: u16,
    first_member: u32,
}

/// Parsed kernel BTF: just the types this reader understands. The kernel's BTF has ~150k types,
/// so nothing here allocates per type beyond these small records.
pub struct Btf {
    strings: Vec<u8>,
    types: Vec<Type>,
    members: Vec<Member>,
}

impl Btf {
    pub fn from_kernel() -> Result<Self, BtfError> {
        Self::parse(&std::fs::read(VMLINUX)?)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u16_at = |at: usize| -> Result<u16, BtfError> {
            data.get(at..at + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .ok_or(BtfError::Malformed("truncated"))
        };
        let u32_at = |at: usize| -> Result<u32, BtfError> {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(BtfError::Malformed("truncated"))
        };
        if u16_at(0)? != MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(4)? as usize;
        let type_start = hdr_len + u32_at(8)? as usize;
        let type_end = type_start + u32_at(12)? as usize;
        let str_start = hdr_len + u32_at(16)? as usize;
        let str_end = str_start + u32_at(20)? as usize;
        let strings =
            data.get(str_start..str_end).ok_or(BtfError::Malformed("string section"))?.to_vec();

        // Type id 0 is `void`.
        let void = Type { kind: 0, name: 0, referenced: 0, vlen: 0, first_member: 0 };
        let mut types = vec![void];
        let mut members = Vec::new();
        let mut at = type_start;
        while at < type_end {
            let name = u32_at(at)?;
            let info = u32_at(at + 4)?;
            let referenced = u32_at(at + 8)?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let bitfield_members = info >> 31 == 1;
            let first_member = members.len() as u32;
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => at += 4,
                KIND_ARRAY => at += 12,
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let offset = u32_at(at + 8)?;
                        members.push(Member {
                            name: u32_at(at)?,
                            type_id: u32_at(at + 4)?,
                            bit_offset: if bitfield_members { offset & 0xff_ffff } else { offset },
                        });
                        at += 12;
                    }
                }
                KIND_ENUM | KIND_FUNC_PROTO => at += 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => at += 12 * vlen,
                0..=KIND_ENUM64 => {}
                _ => return Err(BtfError::Malformed("unknown type kind")),
            }
            types.push(Type {
                kind: kind as u8,
                name,
                referenced,
                vlen: vlen as u16,
                first_member,
            });
        }
        Ok(Btf { strings, types, members })
    }

    fn name(&self, offset: u32) -> &[u8] {
        let tail = self.strings.get(offset as usize..).unwrap_or_default();
        let len = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        &tail[..len]
    }

    /// The id of the type of `kind` called `name`. A linear scan: it runs a few dozen times at
    /// start-up, and an index would cost megabytes for the agent's whole life.
    fn find(&self, kind: u32, name: &str) -> Option<u32> {
        let name = name.as_bytes();
        self.types
            .iter()
            .position(|t| u32::from(t.kind) == kind && self.name(t.name) == name)
            .map(|id| id as u32)
    }

    fn members_of(&self, t: &Type) -> &[Member] {
        let start = t.first_member as usize;
        self.members.get(start..start + t.vlen as usize).unwrap_or_default()
    }

    /// Whether the kernel declares tracepoint `name` (every tracepoint has a `btf_trace_<name>`
    /// typedef, which is also what a BTF tracepoint program attaches by).
    pub fn has_tracepoint(&self, name: &str) -> bool {
        self.find(KIND_TYPEDEF, &format!("btf_trace_{name}")).is_some()
    }

    /// How many parameters kernel function `name` takes, if the kernel has it (not inlined away).
    pub fn function_arity(&self, name: &str) -> Option<usize> {
        let func = self.types.get(self.find(KIND_FUNC, name)? as usize)?;
        let proto = self.types.get(func.referenced as usize)?;
        (u32::from(proto.kind) == KIND_FUNC_PROTO).then_some(proto.vlen as usize)
    }

    /// Byte offset of `path` (e.g. `["__sk_common", "skc_family"]`) inside `struct struct_name`.
    /// Members of anonymous structs and unions are found as if they were direct members, as C
    /// code sees them.
    pub fn member_offset(&self, struct_name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let mut type_id = self
            .find(KIND_STRUCT, struct_name)
            .ok_or_else(|| BtfError::NoStruct(struct_name.to_owned()))?;
        let mut bits: u32 = 0;
        for member in path {
            let (offset, member_type) = self
                .find_member(type_id, member.as_bytes(), 0)
                .ok_or_else(|| BtfError::NoMember(struct_name.to_owned(), path.join(".")))?;
            bits = bits.wrapping_add(offset);
            type_id = member_type;
        }
        Ok(bits / 8)
    }

    /// Anonymous structs and unions nest a few levels deep in real kernels; malformed BTF can
    /// nest them in a cycle. Deeper than this is not searched.
    const MAX_DEPTH: usize = 16;

    fn find_member(&self, type_id: u32, wanted: &[u8], depth: usize) -> Option<(u32, u32)> {
        if depth > Self::MAX_DEPTH {
            return None;
        }
        let container = self.resolve(type_id)?;
        for member in self.members_of(container) {
            let name = self.name(member.name);
            if name == wanted {
                return Some((member.bit_offset, member.type_id));
            }
            if name.is_empty()
                && let Some((inner, found)) = self.find_member(member.type_id, wanted, depth + 1)
            {
                return Some((member.bit_offset.wrapping_add(inner), found));
            }
        }
        None
    }

    /// The struct or union behind typedefs and qualifiers (a few hops; a cycle is not followed).
    fn resolve(&self, mut type_id: u32) -> Option<&Type> {
        for _ in 0..Self::MAX_DEPTH {
            let t = self.types.get(type_id as usize)?;
            match u32::from(t.kind) {
                KIND_STRUCT | KIND_UNION => return Some(t),
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    type_id = t.referenced
                }
                _ => return None,
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: `struct outer { int a; struct { short b; }; struct inner named; }`
    /// plus a `btf_trace_demo` typedef.
    fn sample() -> Vec<u8> {
        let mut strings = b"\0int\0a\0b\0outer\0inner\0named\0c\0btf_trace_demo\0demo\0".to_vec();
        let s = |name: &str, strings: &[u8]| -> u32 {
            let needle = format!("\0{name}\0");
            strings.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap() as u32 + 1
        };
        let mut types = Vec::new();
        let mut ty = |name_off: u32, kind: u32, vlen: u32, size: u32, extra: &[u32]| {
            for v in [name_off, (kind << 24) | vlen, size].iter().chain(extra) {
                types.extend_from_slice(&v.to_le_bytes());
            }
        };
        // 1: int
        ty(s("int", &strings), KIND_INT, 0, 4, &[32]);
        // 2: anonymous struct { int b @ 0 }
        ty(0, KIND_STRUCT, 1, 4, &[s("b", &strings), 1, 0]);
        // 3: struct inner { int c @ 32 bits }
        ty(s("inner", &strings), KIND_STRUCT, 1, 8, &[s("c", &strings), 1, 32]);
        // 4: struct outer { int a @ 0; anon @ 32 bits; struct inner named @ 64 bits }
        ty(
            s("outer", &strings),
            KIND_STRUCT,
            3,
            16,
            &[s("a", &strings), 1, 0, 0, 2, 32, s("named", &strings), 3, 64],
        );
        // 5: typedef btf_trace_demo -> int
        ty(s("btf_trace_demo", &strings), KIND_TYPEDEF, 0, 1, &[]);
        // 6: int (*)(int a, int b); 7: func "demo" of that prototype
        ty(0, KIND_FUNC_PROTO, 2, 1, &[s("a", &strings), 1, s("b", &strings), 1]);
        ty(s("demo", &strings), KIND_FUNC, 0, 6, &[]);
        strings.push(0);
        let mut blob = Vec::new();
        blob.extend_from_slice(&MAGIC.to_le_bytes());
        blob.extend_from_slice(&[1, 0]);
        for v in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            blob.extend_from_slice(&v.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(&strings);
        blob
    }

    #[test]
    fn finds_direct_anonymous_and_nested_members() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("outer", &["a"]).unwrap(), 0);
        assert_eq!(btf.member_offset("outer", &["b"]).unwrap(), 4);
        assert_eq!(btf.member_offset("outer", &["named", "c"]).unwrap(), 12);
    }

    #[test]
    fn reports_missing_struct_and_member() {
        let btf = Btf::parse(&sample()).unwrap();
        assert!(matches!(btf.member_offset("nope", &["a"]), Err(BtfError::NoStruct(_))));
        assert!(matches!(btf.member_offset("outer", &["zzz"]), Err(BtfError::NoMember(..))));
    }

    #[test]
    fn knows_declared_tracepoints() {
        let btf = Btf::parse(&sample()).unwrap();
        assert!(btf.has_tracepoint("demo"));
        assert!(!btf.has_tracepoint("other"));
    }

    #[test]
    fn knows_function_arity() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.function_arity("demo"), Some(2));
        assert_eq!(btf.function_arity("outer"), None);
        assert_eq!(btf.function_arity("missing"), None);
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, not even close").is_err());
        assert!(Btf::parse(&[]).is_err());
    }
}
