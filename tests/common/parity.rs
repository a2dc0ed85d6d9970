//! Reading the Quaterion parity files (`tests/parity/*.json`, see `SCHEMA.md` there).

use serde_json::Value;
use similarity_core::Tensor;
use similarity_core::candle_core::DType;

/// The parsed parity file `name`.
pub fn load(name: &str) -> Value {
    let path = super::repo_root().join("tests/parity").join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn flatten(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        Value::Number(n) => out.push(n.as_f64().unwrap()),
        Value::Bool(b) => out.push(f64::from(u8::from(*b))),
        other => panic!("unexpected tensor element {other}"),
    }
}

/// A tensor of the schema (`{dtype, shape, data}`) as f32 values and its shape.
pub fn values(t: &Value) -> (Vec<f32>, Vec<usize>) {
    let shape: Vec<usize> = t["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let mut flat = Vec::new();
    flatten(&t["data"], &mut flat);
    (flat.into_iter().map(|x| x as f32).collect(), shape)
}

pub fn tensor(t: &Value) -> Tensor {
    let (v, shape) = values(t);
    Tensor::from_vec(v, shape, &super::device()).unwrap()
}

pub fn lookup<'a>(file: &'a Value, reference: &str) -> &'a Value {
    reference.split('.').fold(&file["inputs"], |v, k| &v[k])
}

pub fn assert_close(got: &Tensor, expected: &Value, rel: f32, what: &str) {
    let (want, shape) = values(expected);
    assert_eq!(got.dims(), &shape[..], "{what}: shape");
    let got = got
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= rel * scale.max(w.abs()),
            "{what}[{i}]: got {g}, Quaterion {w}"
        );
    }
}
