fn main() {
    eprintln!("sluice-operator: not built yet");
    std::process::exit(2);
}
