#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| coda::fuzzing::vae_checkpoint(data));
