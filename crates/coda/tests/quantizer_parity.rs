//! The quantizer against PyTorch (fixtures from scripts/make_fixtures.py): resampling at every
//! size pair of both presets (<= 1e-6, gradients too), and the CODA quantizer's ids, f̂, losses
//! and parameter gradients.

mod common;
use common::max_abs;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor, Var};
use candle_nn::VarBuilder;
use coda::quantizer::resample::{Mode, Resize2d};
use coda::quantizer::{AssignRule, CodaQuantizer, QuantizerConfig};

fn fixtures() -> PathBuf {
    common::fixtures("quantizer")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &common::device()).unwrap()
}

fn parse_size(s: &str) -> (usize, usize) {
    let (a, b) = s.split_once('x').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

#[test]
fn resampling_matches_pytorch_values_and_gradients() {
    let io = load("resample.safetensors");
    let mut cases = 0;
    let (mut worst_val, mut worst_grad) = (0f32, 0f32);
    for key in io.keys().filter(|k| k.ends_with("_in")) {
        let base = key.strip_suffix("_in").unwrap();
        let parts: Vec<&str> = base.split('_').collect();
        let mode = if parts[0] == "area" {
            Mode::Area
        } else {
            Mode::Bicubic
        };
        let r = Resize2d::new(
            mode,
            parse_size(parts[1]),
            parse_size(parts[2]),
            &common::device(),
        )
        .unwrap();
        let x = Var::from_tensor(&io[key]).unwrap();
        let y = r.apply(x.as_tensor()).unwrap();
        let want = &io[&format!("{base}_out")];
        let e = max_abs(&y, want);
        // Every square pair the presets use: 1e-6 absolute. The extra non-square pairs have larger
        // values (up to ~4), where 1e-6 is a few f32 ulps of summation order: 1e-6 relative.
        let square = parts[1]
            .split('x')
            .all(|v| v == parts[1].split('x').next().unwrap());
        let tol = if square {
            1e-6
        } else {
            1e-6 * common::abs_max(want).max(1.0)
        };
        assert!(e <= tol, "{base}: max abs error {e} > {tol}");
        let grads = (y * &io[&format!("{base}_g")])
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // A gradient entry sums up to (32/s)^2 products: the tolerance is relative to its scale.
        let want = &io[&format!("{base}_grad")];
        let scale = common::abs_max(want).max(1.0);
        let eg = max_abs(grads.get(&x).unwrap(), want) / scale;
        assert!(eg <= 1e-5, "{base}: gradient max relative error {eg}");
        worst_val = worst_val.max(e);
        worst_grad = worst_grad.max(eg);
        cases += 1;
    }
    println!("{cases} resampling cases: worst value error {worst_val:.2e}, worst relative gradient error {worst_grad:.2e}");
    assert_eq!(cases, 44, "20 area + 20 bicubic preset pairs, 4 non-square");
}

#[test]
fn resampling_gradient_matches_finite_differences() {
    let x = Tensor::randn(0f64, 1.0, (1, 1, 5, 7), &common::device()).unwrap();
    for mode in [Mode::Area, Mode::Bicubic] {
        let (src, dst) = if mode == Mode::Area {
            ((5, 7), (3, 4))
        } else {
            ((5, 7), (9, 11))
        };
        let r = Resize2d::new(mode, src, dst, &common::device()).unwrap();
        let f = |t: &Tensor| -> f64 {
            let y = r.apply(&t.to_dtype(DType::F32).unwrap()).unwrap();
            y.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let xv = Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap();
        let g = r
            .apply(xv.as_tensor())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let analytic = g
            .get(&xv)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let flat = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for i in [0, 6, 17, 34] {
            let h = 1e-3;
            let mut p = flat.clone();
            p[i] += h;
            let mut m = flat.clone();
            m[i] -= h;
            let t = |v: Vec<f64>| Tensor::from_vec(v, (1, 1, 5, 7), &common::device()).unwrap();
            let numeric = (f(&t(p)) - f(&t(m))) / (2.0 * h);
            assert!(
                (numeric - analytic[i] as f64).abs() < 1e-2 * (1.0 + numeric.abs()),
                "{mode:?} [{i}]: {numeric} vs {}",
                analytic[i]
            );
        }
    }
}

fn small_quantizer(vars: bool) -> (CodaQuantizer, Vec<(String, Var)>) {
    small_quantizer_with(vars, AssignRule::Attention)
}

fn small_quantizer_with(vars: bool, assign: AssignRule) -> (CodaQuantizer, Vec<(String, Var)>) {
    let ts = coda::io::read_tensors(&fixtures().join("quantizer.pth"), &common::device()).unwrap();
    let cfg = QuantizerConfig {
        kind: coda::quantizer::QuantizerKind::Attention,
        attn_dim: 8,
        assign,
        ..QuantizerConfig::new(64, 4)
    };
    let mut var_list = Vec::new();
    let map: HashMap<String, Tensor> = ts
        .into_iter()
        .map(|(k, t)| {
            if vars {
                let v = Var::from_tensor(&t).unwrap();
                var_list.push((k.clone(), v.clone()));
                (k, v.as_tensor().clone())
            } else {
                (k, t)
            }
        })
        .collect();
    let q = CodaQuantizer::new(
        cfg,
        VarBuilder::from_tensors(map, DType::F32, &common::device()),
    )
    .unwrap();
    (q, var_list)
}

const SCALES: [(usize, usize); 5] = [(1, 1), (2, 2), (3, 3), (5, 5), (8, 8)];

#[test]
fn training_forward_matches_pytorch_ids_values_losses_and_gradients() {
    // Both paths: the fused recomputing ops (CPU default) and the candle-ops composite.
    check_training_forward(true);
    check_training_forward(false);
}

fn check_training_forward(fused: bool) {
    let io = load("quantizer_io.safetensors");
    let (q, vars) = small_quantizer(true);
    let f = Var::from_tensor(&io["f"]).unwrap();
    let out = if fused {
        q.forward_train_fused(f.as_tensor(), &SCALES).unwrap()
    } else {
        q.forward_train_composite(f.as_tensor(), &SCALES).unwrap()
    };
    for (k, ids) in out.ids.iter().enumerate() {
        let want = io[&format!("ids_{k}")].to_dtype(DType::U32).unwrap();
        let same = ids
            .eq(&want)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(same, 1.0, "scale {k}: id match rate {same}");
    }
    let e_fhat = max_abs(&out.f_hat, &io["f_hat"]);
    let e_lq = max_abs(&out.loss_q.reshape(1).unwrap(), &io["loss_q"]);
    let e_le = max_abs(&out.loss_entropy.reshape(1).unwrap(), &io["loss_entropy"]);
    assert!(e_fhat <= 1e-5, "f_hat {e_fhat}");
    assert!(e_lq <= 1e-5, "loss_q {e_lq}");
    assert!(e_le <= 1e-4, "loss_entropy {e_le}");
    let total = ((out.f_hat * &io["g"]).unwrap().sum_all().unwrap() + &out.loss_q).unwrap();
    let total = (total + (out.loss_entropy * 0.05).unwrap()).unwrap();
    let grads = total.backward().unwrap();
    let mut worst = max_abs(grads.get(&f).unwrap(), &io["grad_f"]);
    for (name, v) in &vars {
        let e = max_abs(
            grads
                .get(v)
                .unwrap_or_else(|| panic!("no gradient for {name}")),
            &io[&format!("grad_{name}")],
        );
        assert!(e <= 1e-4, "gradient of {name}: max abs error {e}");
        worst = worst.max(e);
    }
    println!(
        "{}: f_hat {e_fhat:.2e}, loss_q {e_lq:.2e}, loss_ent {e_le:.2e}, worst gradient {worst:.2e}",
        if fused { "fused" } else { "composite" }
    );
    assert!(worst <= 1e-4);
}

#[test]
fn inference_encode_and_decode_match_training_forward_for_any_chunk_size() {
    let io = load("quantizer_io.safetensors");
    let (q, _) = small_quantizer(false);
    for chunk in [64, 7, 1] {
        let tables = q.tables_chunked(chunk).unwrap();
        let (ids, f_hat) = q.encode(&tables, &io["f"], &SCALES).unwrap();
        for (k, got) in ids.iter().enumerate() {
            let want = io[&format!("ids_{k}")].to_dtype(DType::U32).unwrap();
            assert_eq!(
                got.to_vec3::<u32>().unwrap(),
                want.to_vec3::<u32>().unwrap(),
                "chunk {chunk} scale {k}"
            );
        }
        assert!(max_abs(&f_hat, &io["f_hat"]) <= 1e-5);
        // The candle-ops path (used off the CPU) agrees with the kernel.
        let f_lat = &io["f"];
        for &s in &SCALES {
            let qm =
                coda::quantizer::resample::Resize2d::new(Mode::Area, (8, 8), s, &common::device())
                    .unwrap()
                    .apply(f_lat)
                    .unwrap();
            let a = q.assign(&tables, &qm).unwrap().to_vec3::<u32>().unwrap();
            let b = q
                .assign_composite(&tables, &qm)
                .unwrap()
                .to_vec3::<u32>()
                .unwrap();
            assert_eq!(a, b, "chunk {chunk}, scale {s:?}");
        }
        let decoded = q.decode(&tables, &ids, (8, 8)).unwrap();
        assert!(max_abs(&decoded, &f_hat) <= 1e-6);
    }
}

/// The nearest-value rule (not the reference's; no PyTorch fixture exists for it): every id is
/// the code whose vector is nearest the scale's residual, checked against a brute-force search
/// in f64 over the same residual loop; the fused and candle-ops training paths agree on ids,
/// f̂, losses and every gradient; and the rule does change ids on these random weights.
#[test]
fn nearest_value_rule_picks_the_nearest_code_vector() {
    let io = load("quantizer_io.safetensors");
    let (q, _) = small_quantizer_with(false, AssignRule::NearestValue);
    let tables = q.tables().unwrap();
    let (ids, f_hat) = q.encode(&tables, &io["f"], &SCALES).unwrap();
    let values = tables.values.to_vec2::<f32>().unwrap();
    let dev = common::device();
    let mut residual = io["f"].clone();
    let mut differs = 0;
    let (att_ids, _) = {
        let (qa, _) = small_quantizer(false);
        let t = qa.tables().unwrap();
        qa.encode(&t, &io["f"], &SCALES).unwrap()
    };
    for (k, &s) in SCALES.iter().enumerate() {
        let qm = Resize2d::new(Mode::Area, (8, 8), s, &dev)
            .unwrap()
            .apply(&residual)
            .unwrap();
        let rows = qm
            .permute((0, 2, 3, 1))
            .unwrap()
            .reshape(((), 4))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let got: Vec<u32> = ids[k].flatten_all().unwrap().to_vec1().unwrap();
        for (row, &id) in rows.iter().zip(&got) {
            let dist = |v: &Vec<f32>| -> f64 {
                row.iter()
                    .zip(v)
                    .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                    .sum()
            };
            let best = values.iter().map(dist).fold(f64::INFINITY, f64::min);
            // Ties within float rounding may go either way.
            assert!(
                dist(&values[id as usize]) <= best + 1e-5,
                "scale {k}: id {id} is not nearest"
            );
        }
        let att: Vec<u32> = att_ids[k].flatten_all().unwrap().to_vec1().unwrap();
        differs += got.iter().zip(&att).filter(|(a, b)| a != b).count();
        let z = q.lookup(&tables, &ids[k]).unwrap();
        let up = Resize2d::new(Mode::Bicubic, s, (8, 8), &dev)
            .unwrap()
            .apply(&z)
            .unwrap();
        residual = (residual - up).unwrap();
    }
    assert!(
        differs > 0,
        "the rule picked the attention's ids everywhere"
    );
    let direct = (&io["f"] - &residual).unwrap();
    assert!(max_abs(&direct, &f_hat) <= 1e-5);

    // Training: fused and composite paths agree.
    let run = |fused: bool| {
        let (q, vars) = small_quantizer_with(true, AssignRule::NearestValue);
        let f = Var::from_tensor(&io["f"]).unwrap();
        let out = if fused {
            q.forward_train_fused(f.as_tensor(), &SCALES).unwrap()
        } else {
            q.forward_train_composite(f.as_tensor(), &SCALES).unwrap()
        };
        let total = ((&out.f_hat * &io["g"]).unwrap().sum_all().unwrap() + &out.loss_q).unwrap();
        let total = (total + (&out.loss_entropy * 0.05).unwrap()).unwrap();
        let grads = total.backward().unwrap();
        let mut g: Vec<(String, Tensor)> = vars
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    grads
                        .get(v)
                        .unwrap_or_else(|| panic!("no gradient for {n}"))
                        .clone(),
                )
            })
            .collect();
        g.sort_by(|a, b| a.0.cmp(&b.0));
        (out, g)
    };
    let (a, ga) = run(true);
    let (b, gb) = run(false);
    for (k, (x, y)) in a.ids.iter().zip(&b.ids).enumerate() {
        assert_eq!(
            x.to_vec3::<u32>().unwrap(),
            y.to_vec3::<u32>().unwrap(),
            "scale {k}"
        );
    }
    for (k, x) in a.ids.iter().enumerate() {
        assert_eq!(
            x.to_vec3::<u32>().unwrap(),
            ids[k].to_vec3::<u32>().unwrap(),
            "scale {k}"
        );
    }
    assert!(max_abs(&a.f_hat, &b.f_hat) <= 1e-5);
    let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();
    assert!((scalar(&a.loss_q) - scalar(&b.loss_q)).abs() <= 1e-5);
    let (ea, eb) = (scalar(&a.loss_entropy), scalar(&b.loss_entropy));
    assert!(
        (ea - eb).abs() <= 1e-4 * ea.abs().max(1.0),
        "entropy {ea} vs {eb}"
    );
    let mut worst = 0f32;
    for ((name, x), (_, y)) in ga.iter().zip(&gb) {
        let scale = y
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-3);
        let e = max_abs(x, y) / scale;
        assert!(e <= 1e-3, "gradient of {name}: relative error {e}");
        worst = worst.max(e);
    }
    println!(
        "nearest-value: {differs} ids differ from the attention rule; worst gradient {worst:.2e}"
    );
}
