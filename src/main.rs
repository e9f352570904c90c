fn main() -> std::process::ExitCode {
    kakao_tokend::cli::main()
}
