/* A SIGSEGV handler that prints the native stack (each frame as library+offset and its dynamic symbol) to stderr,
   then dies of the signal as before. benchmarks/aoti_crash_trace.py builds it with cc and installs it (via
   ctypes) in a child process just before the call that crashes, where the machine has no gdb. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

void on_segv(int sig) {  /* exported: dladdr names it without addr2line */
  void *frames[64];
  int n = backtrace(frames, 64);
  char line[512];
  for (int i = 0; i < n; i++) {
    Dl_info info;
    int len;
    if (dladdr(frames[i], &info) && info.dli_fname) {
      len = snprintf(line, sizeof line, "#%d %s+0x%lx %s\n", i, info.dli_fname,
                     (unsigned long)((char *)frames[i] - (char *)info.dli_fbase), info.dli_sname ? info.dli_sname : "?");
    } else {
      len = snprintf(line, sizeof line, "#%d %p\n", i, frames[i]);
    }
    if (len > 0) write(2, line, len < (int)sizeof line ? len : (int)sizeof line - 1);
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

int install_segv_backtrace(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_segv;
  return sigaction(SIGSEGV, &sa, NULL);
}
