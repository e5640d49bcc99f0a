//! Reading a GGUF file's metadata without loading its tensors (`tokenomy inspect`).

use llama_cpp_2::gguf::GgufContext;
use std::path::Path;

/// What `tokenomy inspect` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufSummary {
    pub name: Option<String>,
    pub architecture: String,
    pub context_length: Option<u32>,
    pub quantization: String,
    pub size_bytes: u64,
    pub tensors: i64,
    pub has_chat_template: bool,
    pub sliding_window: Option<u32>,
}

pub fn inspect(path: &Path) -> Result<GgufSummary, String> {
    let size_bytes = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?.len();
    let ctx = GgufContext::from_file(path).ok_or_else(|| format!("{}: not a readable GGUF file", path.display()))?;
    let string = |key: &str| {
        let i = ctx.find_key(key);
        (i >= 0).then(|| ctx.val_str(i).map(str::to_string)).flatten()
    };
    let uint = |key: &str| {
        let i = ctx.find_key(key);
        (i >= 0).then(|| ctx.val_u32(i))
    };
    let architecture = string("general.architecture").ok_or("the GGUF has no general.architecture")?;
    let needed = tensor_data_end(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if size_bytes < needed {
        return Err(format!(
            "{}: truncated: {size_bytes} bytes, and its tensors need {needed} (an interrupted download? fetch it again)",
            path.display()
        ));
    }
    Ok(GgufSummary {
        name: string("general.name"),
        context_length: uint(&format!("{architecture}.context_length")),
        sliding_window: uint(&format!("{architecture}.attention.sliding_window")),
        quantization: uint("general.file_type").map_or("unknown".into(), file_type_name),
        has_chat_template: string("tokenizer.chat_template").is_some(),
        tensors: ctx.n_tensors(),
        size_bytes,
        architecture,
    })
}

/// llama.cpp's `llama_ftype` numbers, as named by `llama-quantize`.
pub fn file_type_name(ftype: u32) -> String {
    let name = match ftype {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4",
        other => return format!("ftype {other}"),
    };
    name.to_string()
}

/// Where a GGUF file's tensor data ends: the data section's start (after the header, the
/// metadata and the tensor infos, aligned) plus the furthest tensor's end. A file shorter than
/// that was cut short (a download without a length that stopped early); llama.cpp would refuse
/// it with nothing better than a null model. Read with a small parser of GGUF's layout (v2/v3),
/// since ggml's reader does not expose the offsets through the crate.
pub fn tensor_data_end(path: &Path) -> Result<u64, String> {
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut r = Reader { r: std::io::BufReader::with_capacity(1 << 16, f), pos: 0 };
    if r.bytes(4)? != b"GGUF" {
        return Err("not a GGUF file".into());
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not read here"));
    }
    let (n_tensors, n_kv) = (r.u64()?, r.u64()?);
    let mut alignment = 32u64;
    for _ in 0..n_kv {
        let key = r.string()?;
        let ty = r.u32()?;
        if key == "general.alignment" && ty == 4 {
            alignment = u64::from(r.u32()?).max(1);
        } else {
            r.skip_value(ty)?;
        }
    }
    let mut end = 0u64;
    for _ in 0..n_tensors.min(1 << 20) {
        r.string()?;
        let n_dims = r.u32()?.min(8);
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64()?);
        }
        let (ty, offset) = (r.u32()?, r.u64()?);
        // Unknown types count one byte: a lower bound that still catches a cut before them.
        let bytes = tensor_bytes(ty, &dims).unwrap_or(1);
        end = end.max(offset.saturating_add(bytes));
    }
    Ok(r.pos.div_ceil(alignment).saturating_mul(alignment).saturating_add(end))
}

/// Bytes of a tensor of ggml type `ty` and shape `dims` (`None` for a type not listed here).
fn tensor_bytes(ty: u32, dims: &[u64]) -> Option<u64> {
    // (elements per block, bytes per block), from ggml's type traits.
    let (block, size): (u64, u64) = match ty {
        0 => (1, 4),            // F32
        1 | 30 | 25 => (1, 2),  // F16, BF16, I16
        24 => (1, 1),           // I8
        26 => (1, 4),           // I32
        27 | 28 => (1, 8),      // I64, F64
        2 => (32, 18),          // Q4_0
        3 => (32, 20),          // Q4_1
        6 => (32, 22),          // Q5_0
        7 => (32, 24),          // Q5_1
        8 => (32, 34),          // Q8_0
        9 => (32, 36),          // Q8_1
        10 => (256, 84),        // Q2_K
        11 => (256, 110),       // Q3_K
        12 => (256, 144),       // Q4_K
        13 => (256, 176),       // Q5_K
        14 => (256, 210),       // Q6_K
        15 => (256, 292),       // Q8_K
        _ => return None,
    };
    let (first, rest) = dims.split_first()?;
    let rows = rest.iter().try_fold(1u64, |a, d| a.checked_mul(*d))?;
    first.div_ceil(block).checked_mul(size)?.checked_mul(rows)
}

struct Reader<R> {
    r: R,
    pos: u64,
}

impl<R: std::io::Read> Reader<R> {
    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, String> {
        let mut b = vec![0; n];
        self.r.read_exact(&mut b).map_err(|_| "truncated in its header".to_string())?;
        self.pos += n as u64;
        Ok(b)
    }
    fn skip(&mut self, n: u64) -> Result<(), String> {
        let got = std::io::copy(&mut std::io::Read::take(&mut self.r, n), &mut std::io::sink()).map_err(|e| e.to_string())?;
        self.pos += got;
        if got < n {
            return Err("truncated in its header".into());
        }
        Ok(())
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u64()?;
        if n > 1 << 24 {
            return Err(format!("a string of {n} bytes in its header"));
        }
        Ok(String::from_utf8_lossy(&self.bytes(n as usize)?).into_owned())
    }
    /// Skips one metadata value of GGUF type `ty`.
    fn skip_value(&mut self, ty: u32) -> Result<(), String> {
        if let Some(w) = scalar_bytes(ty) {
            return self.skip(w);
        }
        match ty {
            8 => {
                let n = self.u64()?;
                self.skip(n)
            }
            9 => {
                let (elem, n) = (self.u32()?, self.u64()?);
                match scalar_bytes(elem) {
                    Some(w) => self.skip(n.saturating_mul(w)),
                    None => (0..n).try_for_each(|_| self.skip_value(elem)),
                }
            }
            other => Err(format!("unknown metadata type {other}")),
        }
    }
}

/// Bytes of a GGUF metadata scalar of type `ty` (`None`: a string, an array, or unknown).
fn scalar_bytes(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1), // u8, i8, bool
        2 | 3 => Some(2),     // u16, i16
        4..=6 => Some(4),     // u32, i32, f32
        10..=12 => Some(8),   // u64, i64, f64
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(file: &str) -> std::path::PathBuf {
        let home = std::env::var_os("TOKENOMY_HOME").map(std::path::PathBuf::from).unwrap_or_else(|| std::path::PathBuf::from(std::env::var_os("HOME").unwrap()).join(".tokenomy"));
        home.join("models").join(file)
    }

    #[test]
    fn a_whole_file_reads_whole_and_a_cut_one_is_named_truncated() {
        // Every test model's tensors end where its file does (Q4_1; Q4_K, Q6_K, Q5_0, Q8_0, F32).
        for file in ["SmolLM2-135M-Instruct.Q4_1.gguf", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "gemma-3-270m-q4_k_m.gguf"] {
            let path = model(file);
            let size = std::fs::metadata(&path).expect("run scripts/fetch-test-models.sh").len();
            let end = tensor_data_end(&path).unwrap();
            assert!(end <= size && size - end < 64, "{file}: the tensors end at the file's end: {end} of {size}");
        }
        let path = model("SmolLM2-135M-Instruct.Q4_1.gguf");
        let cut = std::env::temp_dir().join(format!("tokenomy-cut-{}.gguf", std::process::id()));
        let bytes = std::fs::read(&path).unwrap();
        for len in [bytes.len() - 1_000, bytes.len() / 4] {
            std::fs::write(&cut, &bytes[..len]).unwrap();
            let e = inspect(&cut).unwrap_err();
            assert!(e.contains("truncated"), "{len}: {e}");
        }
        let _ = std::fs::remove_file(&cut);
        assert!(inspect(&path).is_ok());
    }
}
