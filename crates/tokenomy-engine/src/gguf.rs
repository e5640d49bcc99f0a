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
