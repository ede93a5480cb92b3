// A byte-level BPE tokenizer (GPT-2 style) built from a GGUF file's metadata: the token strings
// (tokenizer.ggml.tokens, bytes written with GPT-2's byte -> code point map, "Ġ" = space) and the
// ranked merges (tokenizer.ggml.merges, "left right", rank = position). Kept small: it encodes
// plain text for perplexity runs; it is not a serving tokenizer.
//
//   auto tok = bpe_tokenizer::from_gguf(gguf_file);
//   tok.encode("Hello world") -> ids;  tok.decode(ids) -> the original bytes
//
// Pre-tokenization (tokenizer.ggml.pre):
//   "gpt2" / "default":            GPT-2's split  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   "smollm" / "starcoder" / "refact": every \p{N} code point is first made a piece of its own (so
//                                  " 2000" -> " ", "2", "0", "0", "0"), then GPT-2's split runs
//                                  inside each piece (lookahead stops at piece boundaries).
//   Anything else raises errc::unsupported.
// Then each piece's bytes are merged by lowest merge rank, leftmost first, until no ranked pair is left.
// On SmolLM2 this gives the same ids as Hugging Face `tokenizers` (same vocabulary, merges and
// pre-tokenizer) on the whole wikitext-2-raw test split (304,830 ids) and on CJK, emoji, combining marks.
// Limits: the regex is hand-written over code points; \p{L}, \p{N} and \s are exact for ASCII and
// Latin-1, and approximated by block tables elsewhere (punctuation, symbol, combining-mark and
// digit blocks listed in detail::classify; other non-ASCII code points count as letters). Invalid
// UTF-8 bytes count as one symbol each. Special tokens ("<|im_start|>", ...) written in the text are
// not recognised: they are encoded as ordinary text. No BOS/EOS is added, no normalisation is done.
// Bytes whose one-byte token is absent from the vocabulary (SmolLM2 lacks 21: the control bytes 4, 6,
// 19, 20, 22, 29 and the lead bytes 0xC0, 0xC1, 0xF1, 0xF2, 0xF5-0xFF) join no merge and are dropped,
// as the Hugging Face tokenizers library does; text holding them does not survive encode -> decode.
// Malformed metadata (missing keys, a merge without exactly one separating space, a merge whose
// parts or result are not tokens, duplicate tokens, a printable ASCII byte without a token) raises
// errc::io.
#pragma once

#include <basisattn/core/error.hpp>
#include <basisattn/io/gguf.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace models {

namespace detail {

/// GPT-2's byte -> code point map: printable bytes map to themselves, the other 68 to 256, 257, ...
inline std::vector<std::uint32_t> gpt2_byte_map() {
  std::vector<std::uint32_t> m(256);
  std::uint32_t next = 256;
  for (std::uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    m[b] = printable ? b : next++;
  }
  return m;
}

/// UTF-8 encoding of one code point (< 0x110000).
inline void append_utf8(std::string& s, std::uint32_t c) {
  if (c < 0x80) {
    s += char(c);
  } else if (c < 0x800) {
    s += char(0xC0 | (c >> 6)), s += char(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    s += char(0xE0 | (c >> 12)), s += char(0x80 | ((c >> 6) & 0x3F)), s += char(0x80 | (c & 0x3F));
  } else {
    s += char(0xF0 | (c >> 18)), s += char(0x80 | ((c >> 12) & 0x3F)), s += char(0x80 | ((c >> 6) & 0x3F)),
        s += char(0x80 | (c & 0x3F));
  }
}

/// One decoded code point and the bytes it came from (an invalid byte decodes to itself, length 1).
struct utf8_char {
  std::uint32_t cp;
  std::size_t len;
};
inline utf8_char decode_utf8(const std::string& s, std::size_t i) {
  const auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  const std::size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
  if (len == 0 || i + len > s.size()) return {c, 1};
  std::uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1Fu) : len == 3 ? (c & 0x0Fu) : (c & 0x07u);
  for (std::size_t k = 1; k < len; ++k) {
    if ((b(i + k) & 0xC0) != 0x80) return {c, 1};
    cp = (cp << 6) | (b(i + k) & 0x3Fu);
  }
  const std::uint32_t min_cp = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
  if (len > 1 && (cp < min_cp || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))) return {c, 1};
  return {cp, len};
}

/// The regex classes the GPT-2 split needs.
enum class char_class { letter, number, space, other };

inline bool in(std::uint32_t c, std::uint32_t lo, std::uint32_t hi) { return c >= lo && c <= hi; }

/// \s, \p{N}, \p{L} or anything else: exact for ASCII and Latin-1, block tables beyond (see top).
inline char_class classify(std::uint32_t c) {
  if (c < 0x80) {
    if (c == ' ' || in(c, 0x09, 0x0D)) return char_class::space;
    if (in(c, '0', '9')) return char_class::number;
    if (in(c, 'a', 'z') || in(c, 'A', 'Z')) return char_class::letter;
    return char_class::other;
  }
  if (c == 0x85 || c == 0xA0 || c == 0x1680 || in(c, 0x2000, 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
      c == 0x205F || c == 0x3000)
    return char_class::space;
  if (c < 0x100) {  // Latin-1 supplement
    if (c == 0xB2 || c == 0xB3 || c == 0xB9 || in(c, 0xBC, 0xBE)) return char_class::number;
    if (c == 0xAA || c == 0xB5 || c == 0xBA || (c >= 0xC0 && c != 0xD7 && c != 0xF7)) return char_class::letter;
    return char_class::other;
  }
  if (in(c, 0x660, 0x669) || in(c, 0x6F0, 0x6F9) || in(c, 0x966, 0x96F) || c == 0x2070 || in(c, 0x2074, 0x2079) ||
      in(c, 0x2080, 0x2089) || in(c, 0x2150, 0x2189) || in(c, 0x2460, 0x249B) || in(c, 0x24EA, 0x24FF) ||
      in(c, 0x2776, 0x2793) || c == 0x3007 || in(c, 0x3021, 0x3029) || in(c, 0xFF10, 0xFF19))
    return char_class::number;
  if (in(c, 0x2B9, 0x2FF) || in(c, 0x300, 0x36F) || c == 0x37E || c == 0x387 || in(c, 0x2010, 0x2027) ||
      in(c, 0x2030, 0x205E) || in(c, 0x20A0, 0x20FF) || in(c, 0x2100, 0x214F) || in(c, 0x2190, 0x245F) ||
      in(c, 0x2500, 0x2BFF) || in(c, 0x2E00, 0x2E7F) || in(c, 0x3001, 0x3004) || in(c, 0x3008, 0x3020) ||
      in(c, 0xFE30, 0xFE4F) || in(c, 0xFF01, 0xFF0F) || in(c, 0xFF1A, 0xFF20) || in(c, 0xFF3B, 0xFF40) ||
      in(c, 0xFF5B, 0xFF65) || in(c, 0x1F000, 0x1FAFF))
    return char_class::other;
  return char_class::letter;
}

/// A code point with its class and its byte range in the text.
struct text_char {
  std::uint32_t cp;
  char_class cls;
  std::size_t begin, end;
};

/// Length (in chars) of the GPT-2 regex match at c[i] within [i, n), n > i.
inline std::size_t gpt2_match(const std::vector<text_char>& c, std::size_t i, std::size_t n) {
  const auto cp = [&](std::size_t k) { return k < n ? c[k].cp : 0u; };
  if (cp(i) == '\'') {  // 's 't 'm 'd 're 've 'll (case-sensitive, as GPT-2)
    const std::uint32_t a = cp(i + 1), b = cp(i + 2);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  }
  const std::size_t s = (cp(i) == ' ' && i + 1 < n && c[i + 1].cls != char_class::space) ? i + 1 : i;
  const char_class k = c[s].cls;
  if (k != char_class::space) {  // ' ?\p{L}+', ' ?\p{N}+' or ' ?[^\s\p{L}\p{N}]+'
    std::size_t e = s + 1;
    while (e < n && c[e].cls == k) ++e;
    return e - i;
  }
  std::size_t e = i;  // whitespace run: '\s+(?!\S)', else a single '\s+' char
  while (e < n && c[e].cls == char_class::space) ++e;
  if (e == n) return e - i;
  return e - i > 1 ? e - i - 1 : 1;
}

}  // namespace detail

/// Byte-level BPE encoder/decoder (see the top of the file).
class bpe_tokenizer {
 public:
  enum class pre_split { gpt2, digits_then_gpt2 };

  /// From the token strings (id = index), merges ("left right", rank = index) and the pre-split.
  bpe_tokenizer(std::vector<std::string> tokens, const std::vector<std::string>& merges, pre_split split)
      : tokens_(std::move(tokens)), split_(split) {
    build_vocab();
    build_byte_tokens();
    build_merges(merges);
  }

  /// From tokenizer.ggml.{model, pre, tokens, merges}; errc::io or errc::unsupported when unusable.
  static bpe_tokenizer from_gguf(const basisattn::io::gguf_file& f) {
    const std::string& model = f.get_string("tokenizer.ggml.model");
    BASISATTN_REQUIRE(model == "gpt2", unsupported, "bpe_tokenizer: tokenizer.ggml.model is '", model,
                      "'; only byte-level BPE ('gpt2') is implemented");
    const std::string pre = f.has("tokenizer.ggml.pre") ? f.get_string("tokenizer.ggml.pre") : "default";
    pre_split split = pre_split::gpt2;
    if (pre == "smollm" || pre == "starcoder" || pre == "refact")
      split = pre_split::digits_then_gpt2;
    else
      BASISATTN_REQUIRE(pre == "gpt2" || pre == "default", unsupported, "bpe_tokenizer: pre-tokenizer '", pre,
                        "' is not implemented (gpt2, default, smollm, starcoder, refact are)");
    return bpe_tokenizer(f.get_strings("tokenizer.ggml.tokens"), f.get_strings("tokenizer.ggml.merges"), split);
  }

  std::int32_t vocab_size() const { return static_cast<std::int32_t>(tokens_.size()); }
  pre_split split() const { return split_; }
  /// The stored string of a token (byte-mapped: "Ġthe" for " the").
  const std::string& token(std::int32_t id) const {
    BASISATTN_REQUIRE(id >= 0 && id < vocab_size(), invalid_argument, "bpe_tokenizer: token id ", id, " outside [0, ",
                      vocab_size(), ")");
    return tokens_[std::size_t(id)];
  }
  /// Id of a stored token string, or -1.
  std::int32_t id_of(const std::string& s) const {
    const auto it = vocab_.find(s);
    return it == vocab_.end() ? -1 : it->second;
  }

  /// Pre-split text into pieces (byte ranges, in order, covering the text).
  std::vector<std::string> pre_tokenize(const std::string& text) const {
    std::vector<detail::text_char> c;
    for (std::size_t i = 0; i < text.size();) {
      const detail::utf8_char u = detail::decode_utf8(text, i);
      c.push_back({u.cp, detail::classify(u.cp), i, i + u.len});
      i += u.len;
    }
    std::vector<std::string> pieces;
    std::size_t seg = 0;
    while (seg < c.size()) {  // segments: single digits (digits_then_gpt2) or runs without them
      std::size_t end = seg + 1;
      const bool digit_alone = split_ == pre_split::digits_then_gpt2 && c[seg].cls == detail::char_class::number;
      if (!digit_alone)
        while (end < c.size() && !(split_ == pre_split::digits_then_gpt2 && c[end].cls == detail::char_class::number))
          ++end;
      for (std::size_t i = seg; i < end;) {
        const std::size_t len = detail::gpt2_match(c, i, end);
        pieces.push_back(text.substr(c[i].begin, c[i + len - 1].end - c[i].begin));
        i += len;
      }
      seg = end;
    }
    return pieces;
  }

  /// Token ids of text (no BOS/EOS added).
  std::vector<std::int32_t> encode(const std::string& text) const {
    std::vector<std::int32_t> out;
    for (const std::string& piece : pre_tokenize(text)) {
      const std::vector<std::int32_t> ids = merge_piece(piece);
      out.insert(out.end(), ids.begin(), ids.end());
    }
    return out;
  }

  /// The bytes the ids stand for (token code points mapped back through GPT-2's byte map; a code
  /// point outside the map is written as UTF-8).
  std::string decode(const std::vector<std::int32_t>& ids) const {
    std::string out;
    for (const std::int32_t id : ids) {
      const std::string& t = token(id);
      for (std::size_t i = 0; i < t.size();) {
        const detail::utf8_char u = detail::decode_utf8(t, i);
        const auto it = unbyte_.find(u.cp);
        if (it != unbyte_.end())
          out += char(it->second);
        else
          out.append(t, i, u.len);
        i += u.len;
      }
    }
    return out;
  }

 private:
  std::vector<std::string> tokens_;
  pre_split split_;
  std::unordered_map<std::string, std::int32_t> vocab_;
  std::vector<std::int32_t> byte_token_;                                             // byte -> id of its one-byte token
  std::unordered_map<std::uint32_t, unsigned char> unbyte_;                          // mapped code point -> byte
  std::unordered_map<std::uint64_t, std::pair<std::int32_t, std::int32_t>> merges_;  // (l, r) -> (rank, id)

  static std::uint64_t pair_key(std::int32_t l, std::int32_t r) {
    return (std::uint64_t(std::uint32_t(l)) << 32) | std::uint32_t(r);
  }

  void build_vocab() {
    BASISATTN_REQUIRE(!tokens_.empty() && tokens_.size() < (std::size_t(1) << 31), io,
                      "bpe_tokenizer: ", tokens_.size(), " tokens");
    for (std::size_t i = 0; i < tokens_.size(); ++i) {
      BASISATTN_REQUIRE(!tokens_[i].empty(), io, "bpe_tokenizer: token ", i, " is empty");
      BASISATTN_REQUIRE(vocab_.emplace(tokens_[i], std::int32_t(i)).second, io, "bpe_tokenizer: token '", tokens_[i],
                        "' appears twice (ids ", vocab_[tokens_[i]], " and ", i, ")");
    }
  }

  void build_byte_tokens() {
    const std::vector<std::uint32_t> map = detail::gpt2_byte_map();
    byte_token_.resize(256);
    for (std::uint32_t b = 0; b < 256; ++b) {
      std::string s;
      detail::append_utf8(s, map[b]);
      const std::int32_t id = id_of(s);
      BASISATTN_REQUIRE(id >= 0 || b < 33 || b > 126, io, "bpe_tokenizer: printable byte ", b, " has no token ('", s,
                        "'): not a byte-level vocabulary");
      byte_token_[b] = id;  // -1: the byte is dropped by encode (see the top)
      unbyte_[map[b]] = static_cast<unsigned char>(b);
    }
  }

  void build_merges(const std::vector<std::string>& merges) {
    for (std::size_t r = 0; r < merges.size(); ++r) {
      const std::string& m = merges[r];
      const std::size_t sp = m.find(' ');
      BASISATTN_REQUIRE(
          sp != std::string::npos && sp > 0 && sp + 1 < m.size() && m.find(' ', sp + 1) == std::string::npos, io,
          "bpe_tokenizer: merge ", r, " ('", m, "') is not two tokens separated by one space");
      const std::string l = m.substr(0, sp), rt = m.substr(sp + 1);
      const std::int32_t li = id_of(l), ri = id_of(rt), mi = id_of(l + rt);
      BASISATTN_REQUIRE(li >= 0 && ri >= 0 && mi >= 0, io, "bpe_tokenizer: merge ", r, " ('", m,
                        "') names a token that is not in the vocabulary");
      merges_.emplace(pair_key(li, ri), std::make_pair(std::int32_t(r), mi));  // first (lowest) rank wins
    }
  }

  /// BPE on one piece: start from its bytes, repeatedly merge the lowest-ranked adjacent pair
  /// (leftmost on ties) until no adjacent pair has a merge. Bytes without a token (-1) take part in
  /// no merge and are dropped at the end.
  std::vector<std::int32_t> merge_piece(const std::string& piece) const {
    std::vector<std::int32_t> s;
    s.reserve(piece.size());
    for (const char ch : piece) s.push_back(byte_token_[static_cast<unsigned char>(ch)]);
    while (s.size() > 1) {
      std::int32_t best_rank = -1, best_id = -1;
      std::size_t best = 0;
      for (std::size_t i = 0; i + 1 < s.size(); ++i) {
        const auto it = merges_.find(pair_key(s[i], s[i + 1]));
        if (it != merges_.end() && (best_rank < 0 || it->second.first < best_rank))
          best_rank = it->second.first, best_id = it->second.second, best = i;
      }
      if (best_rank < 0) break;
      s[best] = best_id;
      s.erase(s.begin() + std::ptrdiff_t(best) + 1);
    }
    s.erase(std::remove(s.begin(), s.end(), std::int32_t(-1)), s.end());
    return s;
  }
};

}  // namespace models
