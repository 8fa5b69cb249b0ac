// For tests/unit/test_demangle.py: std's backtrace printer (rustc-demangle) names this call
// chain; the test checks our demangler gives the same names from the symbol table. Covers a
// const generic, a trait impl, nested closures and generic instantiations (including dyn).
mod vmm {
    pub struct Vcpu<const N: usize> {
        pub id: u32,
    }

    pub trait Save {
        fn save(&self, f: &dyn Fn(&u8) -> u8) -> u32;
    }

    impl<const N: usize> Save for Vcpu<N> {
        #[inline(never)]
        fn save(&self, f: &dyn Fn(&u8) -> u8) -> u32 {
            let outer = |x: u32| {
                let inner = || {
                    println!("{}", std::backtrace::Backtrace::force_capture());
                    x
                };
                std::hint::black_box(inner())
            };
            outer(u32::from(f(&1))) + self.id
        }
    }

    #[inline(never)]
    pub fn save_vcpu_state<T: Save + ?Sized>(v: &T) -> u32 {
        v.save(&|b| *b + 1)
    }
}

fn main() {
    let v = vmm::Vcpu::<4> { id: 1 };
    std::hint::black_box(vmm::save_vcpu_state(&v));
    let d: &dyn vmm::Save = &v;
    std::hint::black_box(vmm::save_vcpu_state(d));
}
