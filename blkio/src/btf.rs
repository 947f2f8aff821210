//! Just enough of a BTF reader to find struct member offsets and enum values
//! in the running kernel's type information.
//!
//! Why by hand: aya-obj parses BTF but keeps struct members private, and the
//! one crate that exposes them is LGPL. The format is small and stable
//! (`Documentation/bpf/btf.rst`); this reads the type section only.

use std::collections::HashMap;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("BTF data is malformed: {0}")]
    Malformed(String),
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(String),
    #[error("the kernel's BTF has no member {member} in struct {strukt}")]
    NoMember { strukt: String, member: String },
    #[error("member {member} of struct {strukt} is a bit field")]
    BitField { strukt: String, member: String },
    #[error("the kernel's BTF has no enumerator {0}")]
    NoEnumerator(String),
}

const KIND_INT: u8 = 1;
const KIND_ARRAY: u8 = 3;
const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_ENUM: u8 = 6;
const KIND_TYPEDEF: u8 = 8;
const KIND_VOLATILE: u8 = 9;
const KIND_CONST: u8 = 10;
const KIND_RESTRICT: u8 = 11;
const KIND_FUNC_PROTO: u8 = 13;
const KIND_VAR: u8 = 14;
const KIND_DATASEC: u8 = 15;
const KIND_DECL_TAG: u8 = 17;
const KIND_TYPE_TAG: u8 = 18;
const KIND_ENUM64: u8 = 19;

#[derive(Clone, Debug, Default)]
struct Type {
    name: u32,
    kind: u8,
    /// Referenced type for typedef/const/volatile/...
    target: u32,
    members: Vec<Member>,
    enumerators: Vec<(u32, i64)>,
}

#[derive(Clone, Copy, Debug)]
struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
    bit_size: u32,
}

/// Parsed type section of a BTF blob.
#[derive(Debug)]
pub struct Btf {
    /// Index = type id; id 0 is `void`.
    types: Vec<Type>,
    strings: Vec<u8>,
    structs: HashMap<String, u32>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| BtfError::Malformed(format!("truncated at byte {at}")))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_kernel() -> Result<Self, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.into(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses a little-endian BTF blob (header, types, strings).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::Malformed(
                "bad magic (not little-endian BTF)".into(),
            ));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let section = |off: usize, len: usize, what: &str| {
            hdr_len
                .checked_add(off)
                .and_then(|s| Some((s, s.checked_add(len)?)))
                .and_then(|(s, e)| data.get(s..e))
                .ok_or_else(|| BtfError::Malformed(format!("{what} section out of bounds")))
        };
        let types_raw = section(type_off, type_len, "type")?;
        let strings = section(str_off, str_len, "string")?.to_vec();

        let mut types = vec![Type::default()];
        let mut at = 0;
        while at < types_raw.len() {
            let name = u32_at(types_raw, at)?;
            let info = u32_at(types_raw, at + 4)?;
            let size_or_type = u32_at(types_raw, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = ((info >> 24) & 0x1f) as u8;
            let kind_flag = info >> 31 == 1;
            let mut t = Type {
                name,
                kind,
                target: size_or_type,
                ..Type::default()
            };
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => at += 4,
                KIND_ARRAY => at += 12,
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let offset = u32_at(types_raw, at + 8)?;
                        let (bit_offset, bit_size) = if kind_flag {
                            (offset & 0xff_ffff, offset >> 24)
                        } else {
                            (offset, 0)
                        };
                        t.members.push(Member {
                            name: u32_at(types_raw, at)?,
                            type_id: u32_at(types_raw, at + 4)?,
                            bit_offset,
                            bit_size,
                        });
                        at += 12;
                    }
                }
                KIND_ENUM => {
                    for _ in 0..vlen {
                        let value = u32_at(types_raw, at + 4)? as i32 as i64;
                        t.enumerators.push((u32_at(types_raw, at)?, value));
                        at += 8;
                    }
                }
                KIND_ENUM64 => {
                    for _ in 0..vlen {
                        let lo = u32_at(types_raw, at + 4)? as u64;
                        let hi = u32_at(types_raw, at + 8)? as u64;
                        t.enumerators
                            .push((u32_at(types_raw, at)?, ((hi << 32) | lo) as i64));
                        at += 12;
                    }
                }
                KIND_FUNC_PROTO => at += 8 * vlen,
                KIND_DATASEC => at += 12 * vlen,
                0 | 20.. => {
                    return Err(BtfError::Malformed(format!(
                        "unknown kind {kind} at type {}",
                        types.len()
                    )));
                }
                _ => {}
            }
            types.push(t);
        }
        let mut btf = Self {
            types,
            strings,
            structs: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name != 0 {
                let name = btf.name(t.name).to_owned();
                // The first definition wins (later ones are rare duplicates).
                btf.structs.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    /// Follows typedef/const/volatile/restrict/type-tag to the real type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.target;
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Bit offset and type of `member` in a struct or union, looking through
    /// anonymous struct/union members.
    fn find_member(&self, t: &Type, member: &str, depth: u32) -> Option<(u32, u32, u32)> {
        if depth > 8 {
            return None;
        }
        for m in &t.members {
            if m.name != 0 {
                if self.name(m.name) == member {
                    return Some((m.bit_offset, m.bit_size, m.type_id));
                }
                continue;
            }
            // One anonymous member of an unreadable type does not end the
            // search of its siblings.
            let Some(inner) = self.resolve(m.type_id) else {
                continue;
            };
            if matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Some((off, size, ty)) = self.find_member(inner, member, depth + 1)
            {
                return Some((m.bit_offset + off, size, ty));
            }
        }
        None
    }

    /// Byte offset of a member path (`"bi_iter.bi_size"`) in `struct name`.
    pub fn member_offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        let mut t = self
            .resolve(id)
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        let mut bits = 0u32;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let no_member = || BtfError::NoMember {
                strukt: strukt.into(),
                member: path.into(),
            };
            let (off, size, ty) = self.find_member(t, part, 0).ok_or_else(no_member)?;
            if size != 0 || off % 8 != 0 {
                return Err(BtfError::BitField {
                    strukt: strukt.into(),
                    member: path.into(),
                });
            }
            bits += off;
            if parts.peek().is_some() {
                t = self.resolve(ty).ok_or_else(no_member)?;
            }
        }
        Ok(bits / 8)
    }

    /// Size in bytes of `struct strukt`.
    pub fn struct_size(&self, strukt: &str) -> Result<u32, BtfError> {
        self.structs
            .get(strukt)
            .and_then(|id| self.types.get(*id as usize))
            .map(|t| t.target)
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))
    }

    /// Whether `struct strukt` has a member (path) named so.
    pub fn has_member(&self, strukt: &str, path: &str) -> bool {
        self.member_offset(strukt, path).is_ok()
    }

    /// Value of an enumerator (`PG_head`, `io_cgrp_id`) in any enum.
    pub fn enum_value(&self, enumerator: &str) -> Result<i64, BtfError> {
        self.types
            .iter()
            .filter(|t| matches!(t.kind, KIND_ENUM | KIND_ENUM64))
            .flat_map(|t| t.enumerators.iter())
            .find(|(name, _)| self.name(*name) == enumerator)
            .map(|(_, v)| *v)
            .ok_or_else(|| BtfError::NoEnumerator(enumerator.into()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    /// Builds a BTF blob: types as (name, info, size_or_type, extra words).
    fn blob(strings: &[&str], types: &[(u32, u32, u32, Vec<u32>)]) -> Vec<u8> {
        let mut s = vec![0u8];
        for name in strings {
            s.extend_from_slice(name.as_bytes());
            s.push(0);
        }
        let mut t = Vec::new();
        for (name, info, size, extra) in types {
            for w in [*name, *info, *size].iter().chain(extra) {
                t.extend_from_slice(&w.to_le_bytes());
            }
        }
        let mut out = vec![0x9f, 0xeb, 1, 0];
        for w in [24u32, 0, t.len() as u32, t.len() as u32, s.len() as u32] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend(t);
        out.extend(s);
        out
    }

    fn off(strings: &[&str], name: &str) -> u32 {
        let mut at = 1;
        for s in strings {
            if *s == name {
                return at;
            }
            at += s.len() as u32 + 1;
        }
        panic!("{name}")
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_paths() {
        let names = [
            "long",
            "inner",
            "size",
            "outer",
            "flags",
            "it",
            "PG_head",
            "pageflags",
        ];
        let o = |n| off(&names, n);
        let types = vec![
            // 1: int long
            (o("long"), KIND_INT as u32 * (1 << 24), 8, vec![64]),
            // 2: struct inner { long size @ 32 bits }
            (
                o("inner"),
                (KIND_STRUCT as u32) << 24 | 1,
                8,
                vec![o("size"), 1, 32],
            ),
            // 3: anonymous union { long flags @0 }
            (0, (KIND_UNION as u32) << 24 | 1, 8, vec![o("flags"), 1, 0]),
            // 4: struct outer { union {flags} @64; struct inner it @128 }
            (
                o("outer"),
                (KIND_STRUCT as u32) << 24 | 2,
                24,
                vec![0, 3, 64, o("it"), 2, 128],
            ),
            // 5: enum pageflags { PG_head = 6 }
            (
                o("pageflags"),
                (KIND_ENUM as u32) << 24 | 1,
                4,
                vec![o("PG_head"), 6],
            ),
        ];
        let btf = Btf::parse(&blob(&names, &types)).unwrap();
        assert_eq!(btf.member_offset("outer", "flags").unwrap(), 8);
        assert!(btf.struct_size("outer").unwrap() >= 16);
        assert!(matches!(
            btf.struct_size("missing"),
            Err(BtfError::NoStruct(_))
        ));
        assert_eq!(btf.member_offset("outer", "it.size").unwrap(), 16 + 4);
        assert!(btf.has_member("inner", "size"));
        assert!(matches!(
            btf.member_offset("outer", "nope"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("missing", "x"),
            Err(BtfError::NoStruct(_))
        ));
        assert_eq!(btf.enum_value("PG_head").unwrap(), 6);
        assert!(btf.enum_value("PG_nope").is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, definitely not").is_err());
        let mut b = blob(&["x"], &[(1, (KIND_INT as u32) << 24, 4, vec![32])]);
        b.truncate(b.len() - 3);
        assert!(Btf::parse(&b).is_err());
    }

    #[test]
    fn reads_the_running_kernel_when_present() {
        let btf = match Btf::from_kernel() {
            Ok(btf) => btf,
            Err(e) if std::env::var_os("CI").is_some() => panic!("CI host without BTF: {e}"),
            // A developer host without BTF: the tracker refuses to start
            // there with the same error.
            Err(_) => return,
        };
        assert_eq!(btf.member_offset("folio", "flags").unwrap(), 0);
        // struct page: one cache line on x86-64; compound_head overlays lru.
        assert_eq!(btf.struct_size("page").unwrap(), 64);
        assert_eq!(btf.member_offset("page", "compound_head").unwrap(), 8);
        assert!(btf.member_offset("bio", "bi_iter.bi_size").unwrap() > 0);
        assert!(btf.enum_value("io_cgrp_id").is_ok());
    }
}
