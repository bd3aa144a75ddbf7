//! Reading and writing NumPy `.npy` files (format versions 1.0 to 3.0), C order, little-endian.
//!
//! Only what this crate exchanges: float32/float64 matrices in, float32/float64/int64 out. Every
//! malformed, truncated or unsupported file is an error naming the file, what was found and what
//! was expected; nothing here panics on input.

use std::path::Path;

use crate::error::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// The element type of an array read from a file.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// An array read from a `.npy` file: its shape and its elements in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

impl NpyArray {
    /// The dtype as NumPy names it.
    pub fn dtype_name(&self) -> &'static str {
        match self.data {
            NpyData::F32(_) => "float32",
            NpyData::F64(_) => "float64",
        }
    }

    /// The elements widened to f64 (exact for both dtypes).
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            NpyData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            NpyData::F64(v) => v.clone(),
        }
    }

    /// The elements as f32; float64 input is rounded to nearest.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            NpyData::F32(v) => v.clone(),
            NpyData::F64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
}

/// Reads a float32 or float64 `.npy` file of rank 2 and returns (rows, cols, array).
pub fn read_matrix(path: &Path) -> Result<(usize, usize, NpyArray)> {
    let array = read(path)?;
    match array.shape[..] {
        [rows, cols] => Ok((rows, cols, array)),
        _ => Err(Error::bad_file(
            path,
            format!(
                "shape {:?} has rank {}, expected rank 2 (N x d)",
                array.shape,
                array.shape.len()
            ),
        )),
    }
}

/// Reads a float32 or float64 `.npy` file of any rank.
pub fn read(path: &Path) -> Result<NpyArray> {
    let bytes = crate::files::read_input(path, ".npy input", crate::files::max_bytes::ARRAY)?;
    parse(&bytes).map_err(|msg| Error::bad_file(path, msg))
}

fn parse(bytes: &[u8]) -> std::result::Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(format!(
            "not a .npy file: it starts with {:02x?}, expected the magic bytes \\x93NUMPY",
            &bytes[..bytes.len().min(6)]
        ));
    }
    let major = bytes[6];
    let (header_len, header_start) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(format!(
                    "truncated: {} bytes, too short for a version {major} header",
                    bytes.len()
                ));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => {
            return Err(format!(
                "format version {v}.{} is not supported, expected 1.0, 2.0 or 3.0",
                bytes[7]
            ))
        }
    };
    let data_start = header_start + header_len;
    if bytes.len() < data_start {
        return Err(format!(
            "truncated: the header claims {header_len} bytes but the file has {} after the preamble",
            bytes.len() - header_start
        ));
    }
    let header = std::str::from_utf8(&bytes[header_start..data_start])
        .map_err(|_| "the header is not valid text".to_string())?;
    let descr = dict_value(header, "descr")?;
    let fortran = dict_value(header, "fortran_order")?;
    let shape_text = dict_value(header, "shape")?;

    if fortran.trim() != "False" {
        return Err(format!(
            "fortran_order is {}, expected False (C order)",
            fortran.trim()
        ));
    }
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
    let elem_size = match descr {
        "<f4" | "<f8" => descr[2..].parse::<usize>().unwrap_or(0),
        ">f4" | ">f8" => {
            return Err(format!(
                "dtype '{descr}' is big-endian, expected little-endian '<f4' or '<f8'"
            ))
        }
        other => {
            return Err(format!(
                "dtype '{other}' is not supported, expected float32 ('<f4') or float64 ('<f8')"
            ))
        }
    };
    let shape = parse_shape(shape_text)?;
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &s| acc.checked_mul(s))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    let payload = &bytes[data_start..];
    let expected = count
        .checked_mul(elem_size)
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    if payload.len() != expected {
        let what = if payload.len() < expected {
            "truncated"
        } else {
            "trailing bytes"
        };
        return Err(format!(
            "{what}: shape {shape:?} of {descr} needs {expected} data bytes, the file has {}",
            payload.len()
        ));
    }
    let data = if elem_size == 4 {
        NpyData::F32(
            payload
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    } else {
        NpyData::F64(
            payload
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        )
    };
    Ok(NpyArray { shape, data })
}

/// The text of `'key': value` in the header's Python dict literal, up to the next top-level comma.
fn dict_value<'a>(header: &'a str, key: &str) -> std::result::Result<&'a str, String> {
    let pattern = format!("'{key}':");
    let start = header
        .find(&pattern)
        .map(|i| i + pattern.len())
        .ok_or_else(|| format!("the header has no '{key}' entry: {}", header.trim()))?;
    let rest = &header[start..];
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Ok(&rest[..i]),
            _ => {}
        }
    }
    Err(format!(
        "the header's '{key}' entry is not terminated: {}",
        header.trim()
    ))
}

fn parse_shape(text: &str) -> std::result::Result<Vec<usize>, String> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("shape '{}' is not a tuple", text.trim()))?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("shape entry '{s}' is not a non-negative integer"))
        })
        .collect()
}

/// Element types that can be written.
pub trait NpyElement: bytemuck::Pod {
    const DESCR: &'static str;
}
impl NpyElement for f32 {
    const DESCR: &'static str = "<f4";
}
impl NpyElement for f64 {
    const DESCR: &'static str = "<f8";
}
impl NpyElement for i64 {
    const DESCR: &'static str = "<i8";
}

/// Writes `data` with the given shape as a version 1.0 `.npy` file, atomically (a temporary
/// file in the same folder, then a rename), so that a reader never sees half a file.
pub fn write<T: NpyElement>(path: &Path, shape: &[usize], data: &[T]) -> Result<()> {
    let count: usize = shape.iter().product();
    if count != data.len() {
        return Err(Error::invalid(format!(
            "cannot write {}: shape {shape:?} holds {count} elements but {} were given",
            path.display(),
            data.len()
        )));
    }
    let shape_text = match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_text}, }}",
        T::DESCR
    );
    // The data starts on a 64-byte boundary; the header ends with a newline.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let header_len =
        u16::try_from(header.len()).map_err(|_| Error::invalid("npy header too long"))?;

    let mut bytes =
        Vec::with_capacity(MAGIC.len() + 4 + header.len() + std::mem::size_of_val(data));
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&[1, 0]);
    bytes.extend_from_slice(&header_len.to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    // .npy is little-endian; so is every target this crate builds for.
    bytes.extend_from_slice(bytemuck::cast_slice(data));
    write_atomically(path, &bytes)
}

use crate::durable::write_atomically;

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn round_trip_f32_and_f64() {
        let dir = std::env::temp_dir().join(format!("invaspread-npy-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        write(&p, &[2, 3], &[1.0f32, 2.0, 3.0, 4.0, 5.0, -6.5]).unwrap();
        let (r, c, a) = read_matrix(&p).unwrap();
        assert_eq!((r, c), (2, 3));
        assert_eq!(a.data, NpyData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5]));
        write(&p, &[1, 2], &[0.1f64, 1e300]).unwrap();
        assert_eq!(read(&p).unwrap().data, NpyData::F64(vec![0.1, 1e300]));
        let raw = fs::read(&p).unwrap();
        let data_start = u16::from_le_bytes([raw[8], raw[9]]) as usize + 10;
        assert_eq!(data_start % 64, 0, "data must start on a 64-byte boundary");
        assert_eq!(raw.len() - data_start, 16);
        assert_eq!(raw[data_start - 1], b'\n');
        fs::remove_dir_all(&dir).unwrap();
    }

    fn header(descr: &str, fortran: &str, shape: &str) -> Vec<u8> {
        let h = format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}\n");
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[1, 0]);
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b
    }

    #[test]
    fn malformed_files_are_errors_that_say_why() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"hello world".to_vec(), "not a .npy file"),
            (
                header("<i4", "False", "(2, 2)"),
                "dtype '<i4' is not supported",
            ),
            (header(">f4", "False", "(2, 2)"), "big-endian"),
            (header("<f4", "True", "(2, 2)"), "fortran_order is True"),
            (header("<f4", "False", "(2, 2)"), "truncated"),
            (
                header("<f4", "False", "(2, x)"),
                "not a non-negative integer",
            ),
            (
                MAGIC.iter().copied().chain([1, 0, 200, 0, b'{']).collect(),
                "truncated",
            ),
        ];
        for (bytes, expected) in cases {
            let err = parse(&bytes).unwrap_err();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
        let mut extra = header("<f4", "False", "(1,)");
        extra.extend_from_slice(&[0; 8]);
        assert!(parse(&extra).unwrap_err().contains("trailing bytes"));
    }
}
