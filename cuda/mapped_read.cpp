// A tensor's bytes read through a private read-only mapping of its file, widened to fp32 and
// CRC-32 summed in the same pass: no copy into a read buffer first (the merge's edited tensors).
//
// A mapping has one hazard a read() has not: if the file is truncated (or its pages vanish)
// while mapped, touching a page past the new end raises SIGBUS, which would kill the process.
// The pass runs under a SIGBUS handler that jumps back out of it (per thread), so the caller
// gets an error code instead; a SIGBUS anywhere else goes on to the handler installed before.
// zlib's crc32 is looked up at run time in the libz the interpreter has loaded (no headers).

#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

namespace {

using crc32_fn = unsigned long (*)(unsigned long, const unsigned char*, unsigned int);
crc32_fn zlib_crc32 = nullptr;
struct sigaction previous;
pthread_once_t once = PTHREAD_ONCE_INIT;
thread_local sigjmp_buf* guard = nullptr;
constexpr int64_t CHUNK = 1 << 20;

void on_sigbus(int sig, siginfo_t* info, void* ctx) {
  if (guard != nullptr) siglongjmp(*guard, 1);
  sigaction(SIGBUS, &previous, nullptr);  // not ours: the fault repeats under the earlier handler
}

void setup() {
  void* z = dlopen("libz.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (z == nullptr) z = dlopen("libz.so.1", RTLD_NOW);
  if (z != nullptr) zlib_crc32 = reinterpret_cast<crc32_fn>(dlsym(z, "crc32"));
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGBUS, &sa, &previous);
}

void widen(const unsigned char* src, int64_t n, int64_t itemsize, float* dst) {
  if (itemsize == 4) {
    std::memcpy(dst, src, n);
    return;
  }
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);  // bf16: the top half of an fp32
  for (int64_t i = 0; i < n / 2; ++i) {
    const uint32_t u = uint32_t(s[i]) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}

}  // namespace

extern "C" {

// 1 when this library can read (zlib's crc32 found), else 0: the caller reads without a mapping.
int64_t mapped_read_ready() {
  pthread_once(&once, setup);
  return zlib_crc32 != nullptr;
}

// Read nbytes at offset of path (fp32: itemsize 4, bf16: itemsize 2) into dst as fp32, and their
// CRC-32 into *crc. Returns 0; 1 if the bytes end past the end of the file (SIGBUS caught);
// -errno if opening or mapping failed.
int64_t mapped_read(const char* path, int64_t offset, int64_t nbytes, int64_t itemsize, float* dst,
                    uint32_t* crc) {
  if (!mapped_read_ready()) return -ENOSYS;
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -errno;
  const int64_t page = sysconf(_SC_PAGESIZE), start = offset - offset % page;
  const int64_t length = offset + nbytes - start;
  void* map = mmap(nullptr, length, PROT_READ, MAP_PRIVATE, fd, start);
  const int err = errno;
  close(fd);
  if (map == MAP_FAILED) return -err;
  madvise(map, length, MADV_SEQUENTIAL);
  const unsigned char* src = static_cast<const unsigned char*>(map) + (offset - start);
  sigjmp_buf env;
  int64_t status = 0;
  if (sigsetjmp(env, 1) == 0) {
    guard = &env;
    unsigned long sum = 0;
    for (int64_t done = 0; done < nbytes; done += CHUNK) {
      const int64_t n = nbytes - done < CHUNK ? nbytes - done : CHUNK;
      sum = zlib_crc32(sum, src + done, static_cast<unsigned int>(n));
      widen(src + done, n, itemsize, dst + done / itemsize);
    }
    *crc = static_cast<uint32_t>(sum);
  } else {
    status = 1;
  }
  guard = nullptr;
  munmap(map, length);
  return status;
}

}  // extern "C"
