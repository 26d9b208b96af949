#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| coda::fuzzing::tokenizer_folder(data));
