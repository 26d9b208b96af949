//! `coda tokenizer new`: a fresh tokenizer around a VAE, the starting point of `coda adapt`.

use std::path::PathBuf;

use coda::quantizer::{scales, QuantizerConfig, ScaleSpec};
use coda::tokenizer::{create::new_tokenizer, Tokenizer};
use coda::vae::{LoraConfig, Preset, VaeWeights};

use super::VaeArgs;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Make a new tokenizer: random codebook (N(0,1)), LoRA adapters that start as the identity.
    New(NewArgs),
}

#[derive(clap::Args, Debug)]
pub struct NewArgs {
    #[command(flatten)]
    pub vae: VaeArgs,
    /// V: the number of codes.
    #[arg(long, required_unless_present = "quantizer_from")]
    pub codebook_size: Option<usize>,
    /// Take the quantizer (codebook, attention weights, scales) of this tokenizer, made on the
    /// same encoder, instead of a random one: a warm start for a VAE whose decoder was retrained
    /// (`train-vae --set freeze_encoder=true`). Refused if the encoders differ.
    #[arg(long, conflicts_with_all = ["codebook_size", "scales", "attn_dim"])]
    pub quantizer_from: Option<PathBuf>,
    /// A fixed scale list for the training resolution, e.g. 1,2,3,4,5,6,8,10,13,16; other sizes
    /// use the derived rule with as many scales. Default: derived for any size.
    #[arg(long)]
    pub scales: Option<String>,
    /// Number of scales of the derived rule.
    #[arg(long, default_value_t = scales::DEFAULT_NUM_SCALES, conflicts_with = "scales")]
    pub num_scales: usize,
    /// d_a: attention dimension of queries and keys.
    #[arg(long, default_value_t = 32)]
    pub attn_dim: usize,
    /// How codes are picked: `attention` (argmax of the attention logits, the reference's rule)
    /// or `nearest-value` (the code whose vector is nearest the residual). With
    /// --quantizer-from, overrides that tokenizer's rule.
    #[arg(long, value_parser = ["attention", "nearest-value"])]
    pub assign: Option<String>,
    /// LoRA rank (0: no adapters).
    #[arg(long, default_value_t = 32)]
    pub lora_rank: usize,
    /// Convs whose module path contains one of these get LoRA (default: conv1,conv2, plus
    /// upsample,downsample for the mar-kl16 preset, as in the paper).
    #[arg(long, value_delimiter = ',')]
    pub lora_modules: Option<Vec<String>>,
    /// Training image size, the default --size of encode.
    #[arg(long, default_value_t = 256)]
    pub resolution: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// No --vae: a VAE of the --preset architecture with random weights (seeded by --seed), for
    /// benchmarks and trying the pipeline without a checkpoint.
    #[arg(long, requires = "preset", conflicts_with = "vae")]
    pub random_vae: bool,
    /// The tokenizer folder to write.
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    let Command::New(args) = cmd;
    let random_dir = tempfile::tempdir()?;
    let vae_path = if args.random_vae {
        let preset = args.vae.preset.expect("clap requires --preset");
        let cfg = preset.config();
        let tensors = coda::vae::export::init_parameters(&cfg, args.seed)?;
        let dir = random_dir.path().join("vae");
        coda::vae::export::write_diffusers(&dir, &cfg, &tensors, args.resolution)?;
        dir
    } else {
        args.vae.path()?.to_path_buf()
    };
    let weights = VaeWeights::load(&vae_path, &args.vae.options(), &candle_core::Device::Cpu)?;
    let scale_spec = match &args.scales {
        Some(s) => ScaleSpec::Fixed {
            sizes: scales::parse_list(s).map_err(anyhow::Error::msg)?,
        },
        None => ScaleSpec::Derived {
            num_scales: args.num_scales,
        },
    };
    let lora = (args.lora_rank > 0).then(|| LoraConfig {
        rank: args.lora_rank,
        modules: args.lora_modules.clone().unwrap_or_else(|| {
            let mut m = vec!["conv1".to_string(), "conv2".to_string()];
            if args.vae.preset == Some(Preset::MarKl16) {
                m.extend(["upsample".to_string(), "downsample".to_string()]);
            }
            m
        }),
    });
    // With --quantizer-from the random quantizer made here is replaced below.
    let codebook_size = args.codebook_size.unwrap_or(1);
    let qcfg = QuantizerConfig {
        kind: coda::quantizer::QuantizerKind::Attention,
        attn_dim: args.attn_dim,
        ..QuantizerConfig::new(codebook_size, weights.config.latent_channels)
    };
    anyhow::ensure!(codebook_size > 0, "--codebook-size must be positive");
    let (mut config, mut tensors) = new_tokenizer(
        &weights,
        qcfg,
        scale_spec,
        lora,
        Some(args.resolution),
        args.seed,
    )?;
    if let Some(from) = &args.quantizer_from {
        coda::tokenizer::create::take_quantizer(&mut config, &mut tensors, from)?;
    }
    match args.assign.as_deref() {
        Some("nearest-value") => {
            config.quantizer.assign = coda::quantizer::AssignRule::NearestValue
        }
        Some(_) => config.quantizer.assign = coda::quantizer::AssignRule::Attention,
        None => {}
    }
    Tokenizer::save(&args.output, &config, &tensors)?;
    let f = config.vae.downsample_factor();
    let latent = args.resolution / f;
    let sc = config.scales.for_latent(latent, latent);
    let n: usize = sc.iter().map(|(h, w)| h * w).sum();
    println!(
        "new tokenizer: V = {}, {} latent channels, LoRA {}",
        config.quantizer.codebook_size,
        config.vae.latent_channels,
        config
            .lora
            .as_ref()
            .map(|l| format!("rank {} on {}", l.rank, l.modules.join(",")))
            .unwrap_or("none".into())
    );
    let sides: Vec<usize> = sc.iter().map(|s| s.0).collect();
    println!(
        "at {r}x{r}: scales {sides:?}, {n} tokens",
        r = args.resolution
    );
    println!("wrote {}", args.output.display());
    Ok(())
}
