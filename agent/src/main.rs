fn main() {
    eprintln!("sluice-agent: not built yet");
    std::process::exit(2);
}
