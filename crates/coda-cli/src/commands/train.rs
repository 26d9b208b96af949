//! `coda adapt`, `coda train-vae`, `coda train-vq`: one set of options over the shared trainer.
//! Keys come from `--preset`, `--config run.toml` and `--set key=value` (in that order); the
//! common ones also have flags.

use std::path::PathBuf;

use coda::training::{config::TrainConfig, Event, Role, Start, Trainer};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A TOML file of training keys (see `coda adapt --help` and README).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Hyper-parameter preset: tiny-cpu, mar-16384, flux-65536.
    #[arg(long)]
    pub preset: Option<String>,
    /// Override any key, e.g. `--set lr=1e-4 --set model.codebook_size=4096`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// adapt: the starting tokenizer (made by `coda tokenizer new`).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Training images (a folder, searched recursively).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Validation images.
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Crop size.
    #[arg(long)]
    pub size: Option<u32>,
    #[arg(long)]
    pub batch: Option<usize>,
    /// Optimizer updates.
    #[arg(long)]
    pub steps: Option<u64>,
    /// The run folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in --out from its latest checkpoint. Its saved config.toml is the
    /// starting point; flags and --set given with --resume apply on top. Anything that changes
    /// the result (any key but the log/eval/checkpoint cadence, the training images, the
    /// starting tokenizer's weights) is refused unless --allow-changes.
    #[arg(long)]
    pub resume: bool,
    /// With --resume: continue even though settings, data or the starting tokenizer differ
    /// from the checkpoint's; the changes are listed.
    #[arg(long, requires = "resume")]
    pub allow_changes: bool,
    /// Stop after this many updates (a checkpoint is written); `--resume` continues.
    #[arg(long)]
    pub stop_after: Option<u64>,
}

fn flag_sets(a: &Args) -> Vec<String> {
    let mut s = Vec::new();
    let path = |p: &PathBuf| format!("'{}'", p.display().to_string().replace('\'', ""));
    if let Some(p) = &a.tokenizer {
        s.push(format!("tokenizer={}", path(p)));
    }
    if let Some(p) = &a.data {
        s.push(format!("data={}", path(p)));
    }
    if let Some(p) = &a.val {
        s.push(format!("val={}", path(p)));
    }
    if let Some(p) = &a.out {
        s.push(format!("out={}", path(p)));
    }
    if let Some(v) = a.size {
        s.push(format!("size={v}"));
    }
    if let Some(v) = a.batch {
        s.push(format!("batch={v}"));
    }
    if let Some(v) = a.steps {
        s.push(format!("steps={v}"));
    }
    s
}

pub fn run(role: Role, a: Args) -> anyhow::Result<()> {
    let mut sets = flag_sets(&a);
    sets.extend(a.sets.iter().cloned());
    let cfg = if a.resume {
        let out = a
            .out
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("--resume needs --out RUN_DIR"))?;
        if a.preset.is_some() || a.config.is_some() {
            anyhow::bail!(
                "--resume continues with the run's own {}; --preset and --config start new runs (use --set KEY=VALUE to change a key)",
                out.join("config.toml").display()
            );
        }
        let saved = out.join("config.toml");
        let cfg = TrainConfig::load(&saved)?;
        // Every flag and --set applies on top of the saved config; the trainer then compares
        // the result with the checkpoint's and refuses changes without --allow-changes.
        let mut t = toml::Table::try_from(&cfg)?;
        for s in &sets {
            coda::training::config::merge(&mut t, coda::training::config::parse_set(s)?);
        }
        TrainConfig::from_table(t, &saved)?
    } else {
        TrainConfig::resolve(a.preset.as_deref(), a.config.as_deref(), &sets)?
    };
    for d in cfg.recipe_departures() {
        eprintln!("warning: {d}");
    }
    let start = if a.resume {
        Start::Resume {
            allow_changes: a.allow_changes,
        }
    } else {
        Start::Fresh
    };
    let mut trainer = Trainer::start_on(role, cfg, start, &super::device()?)?;
    for c in trainer.changes() {
        eprintln!("warning: resuming with a change (--allow-changes): {c}");
    }
    let pb = indicatif::ProgressBar::new(trainer.total_steps());
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {msg} (eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_prefix(match role {
        Role::Adapt => "adapt",
        Role::Vae => "train-vae",
        Role::Vq => "train-vq",
    });
    pb.set_position(trainer.step());
    // Without a terminal (logs, CI) the bar is hidden: lines go to stderr, and a step line
    // every `log_every` updates stands in for the bar.
    let log_every = trainer.log_every();
    let until = a.stop_after.map(|n| trainer.step() + n);
    trainer.run(until, &mut |e| match e {
        Event::Start { step, total, images, trainable, lpips } => {
            say(&pb, format!(
                "{} training images, {trainable} trainable parameters, updates {step}..{total}, LPIPS {}",
                images,
                if lpips { "on" } else { "off (no --set lpips=WEIGHTS)" }
            ));
        }
        Event::Step(l) => {
            pb.set_position(l.step);
            pb.set_message(format!("loss {:.4} mse {:.4}", l.loss, l.mse));
            if pb.is_hidden() && (l.step % log_every == 0 || l.step == l.total) {
                eprintln!(
                    "update {}/{}: loss {:.4}, mse {:.4}, {:.2} s",
                    l.step, l.total, l.loss, l.mse, l.seconds
                );
            }
        }
        Event::Skipped { step, reason } => {
            say(&pb, format!("update {step} skipped: {reason}"));
        }
        Event::Eval(r) => {
            let usage = r
                .usage_all
                .map(|u| format!(", usage {u:.1}%"))
                .unwrap_or_default();
            say(&pb, format!(
                "eval @ {}: PSNR {:.2} dB, SSIM {:.4}{usage} ({} images) -> {}",
                r.step,
                r.psnr,
                r.ssim,
                r.images,
                r.grid.display()
            ));
        }
        Event::Checkpoint { step, path } => {
            say(&pb, format!("checkpoint @ {step}: {}", path.display()));
        }
        Event::Exported { path } => {
            say(&pb, format!("exported: {}", path.display()));
        }
    })?;
    pb.finish_and_clear();
    let bad = trainer.bad_images();
    if !bad.is_empty() {
        eprintln!("{} corrupt training image(s) skipped:", bad.len());
        for p in bad {
            eprintln!("  {}", p.display());
        }
    }
    Ok(())
}

/// A line above the progress bar, or on stderr when the bar is hidden.
fn say(pb: &indicatif::ProgressBar, msg: String) {
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}
