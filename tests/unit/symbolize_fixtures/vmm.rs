// Rust stand-in VMM: prints the addresses of a plain function, a generic method instantiation
// and a return address inside save_vcpu_state, then blocks on stdin until the test closes it.
use std::io::{Read, Write};

mod vmm {
    pub struct Vcpu {
        pub id: u32,
    }

    impl Vcpu {
        #[inline(never)]
        pub fn save_state<T: Copy + Into<u64>>(&self, x: T) -> u64 {
            let add = |y: u64| y + u64::from(self.id);
            std::hint::black_box(add(x.into()))
        }
    }

    #[inline(never)]
    pub fn report_caller() {
        // The frame pointer of this function's frame: [saved fp, return address].
        let fp: *const usize;
        unsafe { std::arch::asm!("mov {}, rbp", out(reg) fp) };
        let ret = unsafe { *fp.add(1) };
        println!("frame {ret:#x}");
    }

    #[inline(never)]
    pub fn save_vcpu_state(v: &Vcpu) -> u64 {
        report_caller();
        v.save_state::<u32>(7)
    }
}

fn main() {
    let v = vmm::Vcpu { id: 1 };
    println!("fn {:#x}", vmm::save_vcpu_state as *const () as usize);
    println!("generic {:#x}", vmm::Vcpu::save_state::<u32> as *const () as usize);
    std::hint::black_box(vmm::save_vcpu_state(&v));
    println!("ready");
    std::io::stdout().flush().unwrap();
    let mut buf = [0u8; 1];
    while std::io::stdin().read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
}
