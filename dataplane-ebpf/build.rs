fn main() -> anyhow::Result<()> {
    aya_build::emit_bpf_target_arch_cfg()
}
