//! `coda`: discrete image tokenizers from continuous VAEs, on the command line.

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "coda",
    version,
    about = "CODA image tokenizers: continuous VAEs in, discrete tokens out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Memory a job may use (e.g. 64G, 512M). Jobs estimate their need first and refuse above
    /// it. Default: CODA_MAX_MEMORY, else 90% of the physical memory (or of `ulimit -v`).
    #[arg(long, global = true, value_name = "SIZE", value_parser = parse_memory)]
    max_memory: Option<u64>,
    /// Device to run on: cpu, cuda or cuda:N. Default: CODA_DEVICE, else the first GPU in a
    /// build with the `cuda` feature where one is usable, else the CPU.
    #[arg(long, global = true, value_name = "DEVICE")]
    device: Option<String>,
}

fn parse_memory(s: &str) -> Result<u64, String> {
    coda::limits::parse_size(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum Command {
    /// Images (files or folders) to a token file.
    Encode(commands::encode::Args),
    /// A token file back to images.
    Decode(commands::decode::Args),
    /// Round-trip an image through a tokenizer (or a continuous VAE) and report PSNR.
    Reconstruct(commands::reconstruct::Args),
    /// A whole dataset into a sharded, resumable token store (numpy-readable).
    Tokenize(commands::tokenize::Args),
    /// Reconstruction metrics of a tokenizer or a VAE over a folder of images, as JSON.
    Eval(commands::eval::Args),
    /// Create tokenizers.
    #[command(subcommand)]
    Tokenizer(commands::tokenizer::Command),
    /// Import an official CODA checkpoint (quantizer_ema.pth + vae_ema.pth).
    Import(commands::import::Args),
    /// Adapt a frozen VAE into a discrete tokenizer (the CODA recipe).
    Adapt(commands::train::Args),
    /// Train a continuous KL-VAE from scratch (exported as a diffusers folder).
    TrainVae(commands::train::Args),
    /// Train a VQ tokenizer from scratch (VQGAN-style; VAR-style with model.scales > 1).
    TrainVq(commands::train::Args),
    /// Print a checkpoint's architecture, parameter count and latent shape.
    Info(commands::info::Args),
    /// Measure VAE encode and decode speed (a benchmark, not a test).
    Bench(commands::bench::Args),
}

/// Inference allocates and frees activation and im2col buffers of megabytes on every layer. glibc
/// returns each one above its mmap threshold (or at the top of the heap) to the kernel at once,
/// and faulting the pages of the next one in cost ~15% of the CPU time of a VAE encode+decode
/// (measured with `perf stat`: 1.69 M page faults -> 0.15 M). This process keeps them instead;
/// peak RSS is unchanged within 3%.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() {
    keep_freed_memory();
    coda::quiet_candle_pool();
    coda::single_malloc_arena();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    coda::limits::set_max_memory(cli.max_memory);
    commands::set_device_spec(cli.device);
    let result = match cli.command {
        Command::Encode(a) => commands::encode::run(a),
        Command::Decode(a) => commands::decode::run(a),
        Command::Reconstruct(a) => commands::reconstruct::run(a),
        Command::Tokenize(a) => commands::tokenize::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Tokenizer(c) => commands::tokenizer::run(c),
        Command::Import(a) => commands::import::run(a),
        Command::Adapt(a) => commands::train::run(coda::training::Role::Adapt, a),
        Command::TrainVae(a) => commands::train::run(coda::training::Role::Vae, a),
        Command::TrainVq(a) => commands::train::run(coda::training::Role::Vq, a),
        Command::Info(a) => commands::info::run(a),
        Command::Bench(a) => commands::bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
